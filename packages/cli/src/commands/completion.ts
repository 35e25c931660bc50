/**
 * `aegis completion bash|zsh`: a shell completion script made, when it runs, from the command
 * tree itself (commands, aliases, options, fixed choices), so it never falls behind the
 * commands. Arguments named `instance` complete with the handles `aegis ps -a --json` prints;
 * the words after `--` or a workload's command are left to the shell (file names).
 */
import { Argument, Command, type Option } from 'commander';

export type Shell = 'bash' | 'zsh';

/** What the completion of one command needs, read from commander. */
export interface CommandSpec {
  /** Every way of typing the command after `aegis`, aliases included ('' for aegis itself). */
  paths: string[];
  subcommands: { names: string[]; description: string }[];
  options: { flags: string[]; takesValue: boolean; choices: string[]; description: string }[];
  /** In order; a repeatable argument is last. */
  args: { name: string; repeatable: boolean; choices: string[] }[];
}

/** Every command under `root`, depth first, as `aegis --help` and its subcommands show them. */
export function commandSpecs(root: Command): CommandSpec[] {
  const help = root.createHelp();
  const specs: CommandSpec[] = [];
  const walk = (cmd: Command, paths: string[], siblings: string[]): void => {
    const subs = help.visibleCommands(cmd);
    // `aegis help <command>` (commander's own help command) takes the names beside it.
    const helpFor = cmd.name() === 'help' ? siblings.filter((n) => n !== 'help') : [];
    specs.push({
      paths,
      subcommands: subs.map((s) => ({ names: [s.name(), ...s.aliases()], description: s.description() })),
      options: help.visibleOptions(cmd).map((o: Option) => ({
        flags: [o.short, o.long].filter((f): f is string => f !== undefined),
        takesValue: o.required,
        choices: o.argChoices ?? [],
        description: o.description,
      })),
      args: cmd.registeredArguments.map((a) => ({
        name: a.name(),
        repeatable: a.variadic,
        choices: a.argChoices ?? (a.name() === 'command' ? helpFor : []),
      })),
    });
    const names = subs.map((s) => s.name());
    for (const s of subs)
      walk(
        s,
        paths.flatMap((p) => [s.name(), ...s.aliases()].map((n) => (p ? `${p} ${n}` : n))),
        names,
      );
  };
  walk(root, [''], []);
  return specs;
}

/** A shell word that stays exactly `s` in bash and zsh. */
const quote = (s: string): string => `'${s.replaceAll("'", `'\\''`)}'`;
const words = (xs: string[]): string => quote(xs.join(' '));
const casePattern = (paths: string[]): string => paths.map(quote).join('|');
/** `name:description` for zsh's _describe (a colon in the name is escaped); one line. */
const described = (name: string, description: string): string =>
  quote(`${name.replaceAll(':', '\\:')}:${description.replace(/\s+/g, ' ').trim()}`);

function choiceArms(specs: CommandSpec[], arm: (pattern: string, choices: string[]) => string): string[] {
  const arms: string[] = [];
  for (const s of specs) {
    const named = [
      ...s.options.filter((o) => o.takesValue && o.choices.length > 0).flatMap((o) => o.flags.map((f) => [f, o.choices] as const)),
      ...s.args.filter((a) => a.choices.length > 0).map((a) => [a.name, a.choices] as const),
    ];
    for (const [name, choices] of named) arms.push(arm(s.paths.map((p) => quote(`${p}/${name}`)).join('|'), choices));
  }
  return arms;
}

const argWords = (s: CommandSpec): string[] => s.args.map((a) => (a.repeatable ? `${a.name}...` : a.name));

function bashScript(specs: CommandSpec[]): string {
  const specArms = specs.map(
    (s) =>
      `  ${casePattern(s.paths)})\n` +
      `    cmds=${words(s.subcommands.flatMap((c) => c.names))}\n` +
      `    opts=${words(s.options.flatMap((o) => o.flags))}\n` +
      `    vopts=${words(s.options.filter((o) => o.takesValue).flatMap((o) => o.flags))}\n` +
      `    args=${words(argWords(s))} ;;`,
  );
  const choices = choiceArms(specs, (pattern, c) => `  ${pattern}) echo ${words(c)} ;;`);
  return `# bash completion for aegis, made by \`aegis completion bash\` from aegis's own commands.
# This shell: source <(aegis completion bash)
# Every shell: aegis completion bash > ~/.local/share/bash-completion/completions/aegis

# Sets, for a command path ('' is aegis itself; aliases too): cmds (its subcommands), opts (its
# options), vopts (those taking a value) and args (its arguments; NAME... repeats).
_aegis_spec() {
  cmds='' opts='' vopts='' args=''
  case $1 in
${specArms.join('\n')}
  esac
}

# The fixed values of an option or argument: $1 command path, $2 option or argument name.
_aegis_choices() {
  case $1/$2 in
${choices.join('\n')}
  esac
}

# Instance handles, from the aegis being completed.
_aegis_instances() {
  "\${COMP_WORDS[0]}" ps -a --json 2>/dev/null | sed -n 's/^    "handle": "\\([^"]*\\)".*/\\1/p'
}

_aegis() {
  local cur=\${COMP_WORDS[COMP_CWORD]} cmdpath='' word opt='' a arg='' cmds opts vopts args
  local -i i n=0 k
  _aegis_spec ''
  # Find the command being typed, the arguments it has, and whether cur is an option's value.
  for ((i = 1; i < COMP_CWORD; i++)); do
    word=\${COMP_WORDS[i]}
    case $word in
    --) return 0 ;; # the workload's words: the shell's own completion
    -*)
      # bash splits --opt=value into three words: --opt = value
      if [[ \${COMP_WORDS[i + 1]} == = ]]; then
        if ((i + 2 >= COMP_CWORD)); then opt=$word && break; fi
        i+=2
      elif [[ $word != *=* && " $vopts " == *" $word "* ]]; then
        if ((i + 1 == COMP_CWORD)); then opt=$word && break; fi
        i+=1
      fi
      ;;
    *)
      if ((n == 0)) && [[ " $cmds " == *" $word "* ]]; then
        cmdpath=\${cmdpath:+$cmdpath }$word
        _aegis_spec "$cmdpath"
        continue
      fi
      _aegis_arg
      # A free repeatable argument (a workload's command): its words are not aegis's.
      if [[ $a == *... && $arg != instance ]] && [[ -z $(_aegis_choices "$cmdpath" "$arg") ]]; then return 0; fi
      n+=1
      ;;
    esac
  done
  [[ $cur == = ]] && cur=''
  if [[ -n $opt ]]; then
    COMPREPLY=($(compgen -W "$(_aegis_choices "$cmdpath" "$opt")" -- "$cur"))
    return 0
  fi
  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    return 0
  fi
  local candidates=''
  ((n == 0)) && candidates=$cmds
  _aegis_arg
  case $arg in
  '') ;;
  instance) candidates+=" $(_aegis_instances)" ;;
  *) candidates+=" $(_aegis_choices "$cmdpath" "$arg")" ;;
  esac
  COMPREPLY=($(compgen -W "$candidates" -- "$cur"))
}

# Sets a (as in args) and arg (its name) for the argument at position n.
_aegis_arg() {
  k=0 a='' arg=''
  for a in $args; do
    if ((k == n)) || [[ $a == *... ]]; then
      arg=\${a%...}
      return 0
    fi
    k+=1
  done
  a=''
}

complete -o default -F _aegis aegis
`;
}

function zshScript(specs: CommandSpec[]): string {
  const specArms = specs.map(
    (s) =>
      `    ${casePattern(s.paths)})\n` +
      `      names=(${s.subcommands.flatMap((c) => c.names.map(quote)).join(' ')})\n` +
      `      cmds=(${s.subcommands.flatMap((c) => c.names.map((n) => described(n, c.description))).join(' ')})\n` +
      `      opts=(${s.options.flatMap((o) => o.flags.map((f) => described(f, o.description))).join(' ')})\n` +
      `      vopts=(${s.options
        .filter((o) => o.takesValue)
        .flatMap((o) => o.flags.map(quote))
        .join(' ')})\n` +
      `      args=(${argWords(s).map(quote).join(' ')}) ;;`,
  );
  const choices = choiceArms(specs, (pattern, c) => `    ${pattern}) reply=(${c.map(quote).join(' ')}) ;;`);
  return `#compdef aegis
# zsh completion for aegis, made by \`aegis completion zsh\` from aegis's own commands.
# This shell (after compinit): source <(aegis completion zsh)
# Every shell: aegis completion zsh > ~/.zfunc/_aegis, with fpath=(~/.zfunc $fpath) before compinit

# Sets, for a command path ('' is aegis itself; aliases too): names and cmds (its subcommands,
# as name:description), opts (its options, likewise), vopts (those taking a value) and args
# (its arguments; NAME... repeats).
_aegis_spec() {
  names=() cmds=() opts=() vopts=() args=()
  case $1 in
${specArms.join('\n')}
  esac
}

# The fixed values of an option or argument, in reply: $1 command path, $2 option or argument name.
_aegis_choices() {
  reply=()
  case $1/$2 in
${choices.join('\n')}
  esac
}

# Sets a (as in args) and arg (its name) for the argument at position n.
_aegis_arg() {
  local -i k=0
  a='' arg=''
  for a in $args; do
    if (( k == n )) || [[ $a == *... ]]; then
      arg=\${a%...}
      return 0
    fi
    (( k++ ))
  done
  a=''
}

_aegis() {
  local -a names cmds opts vopts args reply
  local cmdpath='' word opt='' a='' arg=''
  local -i i n=0
  _aegis_spec ''
  for (( i = 2; i < CURRENT; i++ )); do
    word=\${words[i]}
    case $word in
      (--) _files; return ;;
      (-*)
        if [[ $word != *=* ]] && (( \${vopts[(Ie)$word]} )); then
          if (( i + 1 == CURRENT )); then opt=$word; break; fi
          (( i++ ))
        fi
        ;;
      (*)
        if (( n == 0 && \${names[(Ie)$word]} )); then
          cmdpath=\${cmdpath:+$cmdpath }$word
          _aegis_spec "$cmdpath"
          continue
        fi
        _aegis_arg
        _aegis_choices "$cmdpath" "$arg"
        # A free repeatable argument (a workload's command): its words are not aegis's.
        if [[ $a == *... && $arg != instance ]] && (( ! $#reply )); then _files; return; fi
        (( n++ ))
        ;;
    esac
  done
  if [[ -z $opt && \${words[CURRENT]} == -*=* ]]; then
    opt=\${words[CURRENT]%%=*}
    compset -P '*='
  fi
  if [[ -n $opt ]]; then
    _aegis_choices "$cmdpath" "$opt"
    if (( $#reply )); then compadd -a reply; else _files; fi
    return
  fi
  if [[ \${words[CURRENT]} == -* ]]; then
    _describe -t options option opts
    return
  fi
  (( n == 0 && $#cmds )) && _describe -t commands command cmds
  _aegis_arg
  case $arg in
    ('') ;;
    (instance)
      reply=(\${(f)"$(\${words[1]} ps -a --json 2>/dev/null | sed -n 's/^    "handle": "\\([^"]*\\)".*/\\1/p')"})
      compadd -a reply
      ;;
    (*)
      _aegis_choices "$cmdpath" "$arg"
      compadd -a reply
      ;;
  esac
}

if [[ \${zsh_eval_context[-1]} == loadautofunc ]]; then
  _aegis "$@"
else
  compdef _aegis aegis
fi
`;
}

/** The completion script for `shell`, from the commands under `root` as they are now. */
export function completionScript(root: Command, shell: Shell): string {
  const specs = commandSpecs(root);
  return shell === 'bash' ? bashScript(specs) : zshScript(specs);
}

export function completionCommand(): Command {
  return new Command('completion')
    .description('print a shell completion script (bash or zsh): source <(aegis completion bash)')
    .addArgument(new Argument('<shell>', 'bash or zsh').choices(['bash', 'zsh']))
    .action((shell: Shell, _options: unknown, command: Command) => {
      let root = command;
      while (root.parent) root = root.parent;
      process.stdout.write(completionScript(root, shell));
    });
}

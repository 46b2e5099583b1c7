"""Helpers every script shares: one-line user errors, atomic writes, name -> thing lookups, argument checks.

    from kit.common import UserError, atomic_write, lookup, run_main
    run_main(main)                      # a UserError raised in main() prints as one 'error:' line, exit 2

Standard library only: every script builds and checks its command line with these before its heavy imports,
so --help and a mistyped flag answer at once.
"""
import argparse
import difflib
import os
import sys
from pathlib import Path


class UserError(ValueError):
    """A problem with the user's input: printed as one line, never as a traceback."""


def run_main(main):
    """Run a script's main(), turning a UserError into one 'error:' line and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto path, so a crash never leaves a half-written file. A folder that
    cannot be made or written (a file in the way, no permission, a full disk) is one UserError naming it."""
    atomic_write_all({path: write})


def atomic_write_all(writers):
    """atomic_write for files that belong together ({path: write}): each is written to a temporary name and
    all are renamed only once every one was written, so a failure never leaves a mismatched set."""
    temporary = {Path(p): Path(p).with_name(f".{Path(p).name}.tmp{os.getpid()}") for p in writers}
    path = None
    try:
        for (path, tmp), write in zip(temporary.items(), writers.values()):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        raise UserError(f"cannot write {path} ({type(err).__name__}: {err.strerror or err}): "
                        "choose a writable output path") from None
    except OSError as err:
        if err.errno is None:  # not a file-system error (e.g. an image library's): not ours to reword
            raise
        raise UserError(f"cannot write {path} ({err.strerror}): free space or choose another output path") from None
    finally:
        for tmp in temporary.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # its folder could not be made: nothing to remove
                pass


def one_line(err, limit):
    """An exception's message on one line (hub and state-dict errors span several), cut to limit."""
    return " ".join(str(err).split())[:limit]


def duration_text(seconds):
    """'40 s', '12 minutes' or '2.7 hours'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} minutes" if seconds < 5400 else f"{seconds / 3600:.1f} hours"


def lookup(registry, name, what):
    """registry[name], or a UserError naming close matches and every valid name."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(str(name), list(registry), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown {what} '{name}'{hint} valid: {', '.join(registry)}")


# ---- command lines ------------------------------------------------------------------------------
class KitParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad value) are one UserError line, as every other input error; an
    unknown flag is answered with the closest known one."""

    def parse_args(self, args=None, namespace=None):
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            word = next((w for w in unknown if w.startswith("-")), unknown[0])
            flags = [f for action in self._actions for f in action.option_strings if f.startswith("--")]
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
            self.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {close[0]}?" if close else ""))
        return args

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def in_range(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: kind(text) within [low, high] (open ends where asked), else a line naming the range."""
    rule = " and ".join(r for r in (low is not None and f"{'>' if low_open else '>='} {low}",
                                    high is not None and f"{'<' if high_open else '<='} {high}") if r)

    def convert(text):
        value = kind(text)
        if (low is not None and (value < low or low_open and value == low)) or (
                high is not None and (value > high or high_open and value == high)):
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value
    convert.__name__ = kind.__name__
    return convert


def float_list(text):
    """An argparse type: '0.7,0.3' -> [0.7, 0.3]."""
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers like 0.7,0.3") from None


def read_settings_file(path, parser):
    """Argument defaults from a YAML or JSON file (--config), each value checked by its argument's own type
    and choices, so a file is held to the same rules as the command line."""
    import yaml  # imported here: only --config needs it; YAML is a superset of JSON, so one reader serves both
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"config file {path} not found: check --config") from None
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not readable YAML/JSON ({' '.join(str(err).split())[:120]}): fix the file") from None
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    if not isinstance(values, dict) or set(values) - set(actions):
        unknown = sorted(map(str, set(values) - set(actions))) if isinstance(values, dict) else ["(not a mapping)"]
        raise UserError(f"{path}: unknown settings {', '.join(unknown)}; see {parser.prog} --help")
    return {key: checked_setting(path, actions[key], value) for key, value in values.items()}


def checked_setting(path, action, value):
    """A --config value converted and checked as the command line would."""
    if value is None:
        return value
    if action.nargs == 0:  # an on/off flag
        if not isinstance(value, bool):
            raise UserError(f"{path}: {action.dest}: {value!r} must be true or false")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    listed = isinstance(value, list)
    words = value if many and listed else [",".join(map(str, value)) if listed else value]  # [0.7, 0.3] -> 0.7,0.3
    try:
        converted = [(action.type or str)(str(w)) for w in words]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise UserError(f"{path}: {action.dest}: {value!r} is not what {action.option_strings[0]} takes "
                        f"({err if isinstance(err, argparse.ArgumentTypeError) else getattr(action.type, '__name__', 'text')})") from None
    if action.choices and any(v not in action.choices for v in converted):
        raise UserError(f"{path}: {action.dest}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted if many else converted[0]


def given_names(build_parser, argv):
    """The settings named on argv (not defaults), from a fresh parser whose defaults are all left out."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))

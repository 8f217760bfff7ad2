"""`pixeldit-eqx`, the command line: `sample`, `convert`, `info`, `train-digits`.

Needs the `cli` extra (`pip install 'pixeldit-eqx[cli]'`). Every failure ends as one line
on stderr, `pixeldit-eqx: error: ...`, and a non-zero exit status.
"""

import sys


_MAX_ERROR = 600  # characters of a long (multi-line) message kept on the one error line


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = " | ".join(lines) if lines else "(no message)"
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 30].rstrip() + f" ... ({len(lines)} lines in all)"


def main(argv: list[str] | None = None) -> int:
    """Runs `pixeldit-eqx` with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        from .._optional import require

        require("typer", "cli", "the pixeldit-eqx command line")
        import typer
        import typer.main

        from ._app import app

        command = typer.main.get_command(app)
        try:
            command.main(args=args, prog_name="pixeldit-eqx", standalone_mode=False)
        except typer.Exit as e:
            return e.exit_code
        except typer.Abort:
            print("pixeldit-eqx: aborted", file=sys.stderr)
            return 130
        except typer.TyperException as e:  # a usage error: unknown option, missing argument, bad value
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            print(f"pixeldit-eqx: error: {_one_line(message)} (see --help)", file=sys.stderr)
            return getattr(e, "exit_code", 2)
        except (ValueError, OSError) as e:  # StateDictError and the checkpoint errors are ValueErrors
            print(f"pixeldit-eqx: error: {_one_line(str(e))}", file=sys.stderr)
            return 1
    except ImportError as e:
        print(f"pixeldit-eqx: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except SystemExit as e:  # the digits job's own option parser
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(main())

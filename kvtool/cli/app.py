"""The ``kvtool`` command: assembly only (each command lives in its own module)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from kvtool import __version__
from kvtool.cli._output import Output
from kvtool.cli.bench import EXAMPLES as BENCH_EXAMPLES
from kvtool.cli.bench import bench
from kvtool.cli.calibrate import EXAMPLES as CALIBRATE_EXAMPLES
from kvtool.cli.calibrate import calibrate
from kvtool.cli.capture import capture
from kvtool.cli.decode import EXAMPLES as DECODE_EXAMPLES
from kvtool.cli.decode import decode
from kvtool.cli.encode import EXAMPLES as ENCODE_EXAMPLES
from kvtool.cli.encode import encode
from kvtool.cli.export import export
from kvtool.cli.inspect import inspect

app = typer.Typer(
    name="kvtool",
    help="Calibrate KV-cache compression and turn prefix KV caches into compact artifacts. Exit codes: "
    "0 ok, 1 runtime failure, 2 usage, 3 bad or incompatible artifact, 4 quality gate failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(epilog=CALIBRATE_EXAMPLES)(calibrate)
app.command(epilog=BENCH_EXAMPLES)(bench)
app.command()(capture)
app.command(epilog=ENCODE_EXAMPLES)(encode)
app.command(epilog=DECODE_EXAMPLES)(decode)
app.command()(inspect)
app.command()(export)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library logs and progress bars on stderr."),
) -> None:
    _configure_logging(verbose)


def _configure_logging(verbose: bool) -> None:
    """Progress and logs go to stderr; third-party chatter only with ``-v``."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # libraries' own progress bars (tqdm: the GGUF conversion's, weight loading) and Python warnings (deprecation
        # notices meant for developers) stay off the user's terminal; kvtool's warnings go through Output
        os.environ.setdefault("TQDM_DISABLE", "1")
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main() -> None:
    """Console-script entry point: every exit is a documented code, every parser error one line on stderr."""
    try:
        code = app(prog_name="kvtool", standalone_mode=False)
    except BrokenPipeError:  # `kvtool decode x.kvz -o - | head`: the reader left; nothing more to say
        _silence_stdout()
        sys.exit(1)
    except Exception as e:  # typer's own usage errors (it vendors click: match by behaviour, not by class)
        exit_code, message = getattr(e, "exit_code", None), getattr(e, "format_message", None)
        if not isinstance(exit_code, int) or message is None:
            raise
        text = " ".join(str(message()).split())
        if text:  # an empty message is "no arguments": the help was printed already
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if getattr(ctx, "command_path", None) else ""
            Output().error(text + hint)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass

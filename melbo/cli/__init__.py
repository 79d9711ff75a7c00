"""The ``melbo`` command line, a thin layer over the public API (one module per command group).

Bad input (a :class:`melbo.core.errors.MelboError`, or a click usage error) ends with a one-line
``error: ...`` message and exit code 2; nothing half written is left behind.
"""

from __future__ import annotations

import sys

import click

from melbo.cli.capability import capability
from melbo.cli.chat import chat
from melbo.cli.detect import bench_detect, detect
from melbo.cli.export import export
from melbo.cli.judge import judge_command
from melbo.cli.look import generate, plot
from melbo.cli.planted import bench, demo, plant
from melbo.cli.report import report
from melbo.cli.sweep import sweep
from melbo.cli.train import calibrate, ortho, train
from melbo.core.errors import MelboError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="melbo")
def cli() -> None:
    """melbo: find steering vectors, adapters and transcoders that switch a language model into its latent
    behaviors, with no labels (MELBO and deep causal transcoding)."""


for command in (train, generate, chat, export, report, detect, sweep, ortho, plot, calibrate, plant, bench, demo):
    cli.add_command(command)
cli.add_command(judge_command)
bench.add_command(capability)
bench.add_command(bench_detect)


def check_utf8_args(argv: list[str]) -> None:
    """Refuse a command-line argument that is not UTF-8 text. Python hands such bytes over as
    lone surrogates (PEP 383), which would reach tokenizers and files as garbage.

    Raises:
        MelboError: naming the argument (the option it belongs to) and the first bad byte.
    """
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:
            if arg.startswith("--") and "=" in arg[: e.start]:
                name, arg = f"the value of {arg.split('=', 1)[0]}", arg.split("=", 1)[1]
            elif i > 0 and argv[i - 1].startswith("-") and not arg.startswith("-"):
                name = f"the value of {argv[i - 1]}"
            else:
                name = f"argument {i + 1}"
            c = next(ord(ch) for ch in arg if 0xD800 <= ord(ch) <= 0xDFFF)
            bad = f"byte {c - 0xDC00:#04x}" if 0xDC80 <= c <= 0xDCFF else f"code point U+{c:04X}"
            shown = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in arg)
            raise MelboError(
                f"{name} ({shown!r}) is not UTF-8 text ({bad}); "
                f"give command-line arguments (prompts, paths, names) as UTF-8"
            ) from None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``melbo`` script: runs :data:`cli`, exit code 2 on bad input."""
    try:
        check_utf8_args(sys.argv[1:] if argv is None else list(argv))
        cli.main(args=argv, standalone_mode=False)
    except MelboError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()

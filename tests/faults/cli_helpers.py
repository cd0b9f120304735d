"""What every fault case checks about a failing command: its exit code, and one paragraph with no
traceback."""

from __future__ import annotations

from vlexport.cli import main


def cli(capsys, *argv: object) -> tuple[int, str]:
    """Exit code and stderr (whitespace folded) of ``vlexport ARGV``; asserts one paragraph, no traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip(), err
    assert "\n\n" not in err.strip(), f"more than one paragraph: {err}"
    return code, " ".join(err.split())

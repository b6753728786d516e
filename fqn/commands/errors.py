"""How a user error reads: one line that names the file and says what to do, as ``fqn COMMAND: message``.

`fqn.commands.cli.main` catches the errors a person can fix (`USER_ERRORS`) and prints `error_line` of them instead
of a traceback; ``fqn --debug`` lets them through. The line keeps what fqn's own messages say, folds the nested
messages of a DataLoader worker or of jsonargparse into one line, and points to ``--debug`` when the error came from
a library below fqn, whose message may not say what to do.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

#: What a person can fix from one line: bad data or config values, missing files, bad command-line arguments, an
#: optional package not installed.
USER_ERRORS = (ValueError, OSError, ImportError, argparse.ArgumentError)
_NOISE = ("Subtypes:", "Given value", "Errors:", "Does not validate against any of the Union subtypes",
          "- Expected a <class 'NoneType'>")


def error_line(err: BaseException) -> str:
    r"""One line of ``err``'s message: a DataLoader worker's re-raise keeps the original message, jsonargparse's
    nested type errors keep their reasons, and an error raised outside fqn points to ``--debug``.

    Example:
        >>> error_line(ValueError("Parser key 'model.quant':\n  Errors:\n    - bits_w must be an integer"))
        "Parser key 'model.quant': bits_w must be an integer (fqn --debug shows the traceback)"
    """
    text, raised_in_fqn = str(err), _raised_in_fqn(err)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the last line is "module.Error: message"
        files = re.findall(r'File "([^"]+)"', text)
        raised_in_fqn = bool(files) and _in_fqn(files[-1])
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    lines = [line.strip().removeprefix("- ") for line in text.splitlines()]
    line = " ".join(x for x in lines if x and not x.startswith(_NOISE)) or type(err).__name__
    if isinstance(err, argparse.ArgumentError):
        return f"{line} (--help lists the options)"
    return line if raised_in_fqn else f"{line} (fqn --debug shows the traceback)"


def _raised_in_fqn(err: BaseException) -> bool:
    """Whether ``err`` was raised by fqn's own code, whose messages say what to do (not by a library below it)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _in_fqn(tb.tb_frame.f_code.co_filename)


def _in_fqn(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1])  # the fqn package

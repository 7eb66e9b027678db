"""Running moue's commands from a test."""


def refused(capsys, *argv: str) -> str:
    """A refusal in this process (the command's own ``main``; a process start and Megatron's
    import saved, about 7 s each): exit status 2, an error message and no traceback; returns
    stderr.
    Each test file that uses it also checks the exit status of a real process."""
    from moue.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("error") >= 1 and "Traceback" not in err, err
    return err


def ran(*argv: str, capsys=None) -> str:
    """A command that must succeed, run in this process (its ``main``); returns its stdout when
    ``capsys`` is given (a module fixture has none, and leaves the output to pytest)."""
    from moue.cli import main

    if capsys is not None:
        capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out if capsys is not None else ""

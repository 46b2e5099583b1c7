"""Helpers shared by test files (pytest puts this folder on sys.path)."""
import pytest

from kit.common import UserError


def one_line_error(call):
    """The UserError message call() raises, asserted to be one line."""
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message

"""The one exception type melbo raises for bad input."""


class MelboError(ValueError):
    """Bad input: the message names the bad value and what is allowed.

    The CLI turns it into ``error: <message>`` and exit code 2.
    """

"""placeholder"""


def register() -> None:
    """placeholder"""

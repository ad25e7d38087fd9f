"""argparse value types shared by the command-line entry points."""
import argparse


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults in help, except where they mislead: required options, on/off switches and None."""

    def _get_help_string(self, action):
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.required or switch or action.default is None:
            return action.help
        return super()._get_help_string(action)

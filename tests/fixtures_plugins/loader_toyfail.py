"""Toy loader that raises midway, after some messages, without telling the saver (the driver must)."""

from loader_toy import add_arguments as toy_arguments
from loader_toy import load_checkpoint as toy_load


def add_arguments(parser):
    toy_arguments(parser)
    parser.set_defaults(toy_fail_at=1, toy_messages=3)


def load_checkpoint(queue, args):
    toy_load(queue, args)

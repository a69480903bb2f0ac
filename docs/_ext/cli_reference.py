"""Writes the command-line reference from the argparse parsers themselves, so
that it cannot drift from the code: ``.. unitary-lr-help::`` is replaced by
each subcommand's ``--help`` text."""

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class UnitaryLrHelp(SphinxDirective):
    has_content = False

    def run(self):
        from unitary_lr.cli import build_parser

        parser = build_parser()
        commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        section_nodes = []
        for name, subparser in commands.choices.items():
            section = nodes.section(ids=[f"unitary-lr-{name}"])
            section += nodes.title(text=f"unitary-lr {name}")
            help_text = subparser.format_help().replace("usage: unitary-lr", "unitary-lr", 1)
            section += nodes.literal_block(help_text, help_text)
            section_nodes.append(section)
        return section_nodes


def setup(app):
    app.add_directive("unitary-lr-help", UnitaryLrHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

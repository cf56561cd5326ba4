"""MkDocs hook: the reference pages generated from the code (``ewgs_plugins.reference``),
added to the build in memory so that they never drift from the schema and the parser."""

from __future__ import annotations

from mkdocs.structure.files import File, Files

from ewgs_plugins.reference import cli_reference_markdown, recipe_reference_markdown

GENERATED = {
    "reference/recipe.md": recipe_reference_markdown,
    "reference/cli.md": cli_reference_markdown,
}


def on_files(files: Files, config) -> Files:
    for path, make in GENERATED.items():
        files.append(File.generated(config, path, content=make()))
    return files

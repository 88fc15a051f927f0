"""Reading organism.yaml safely: bounded size, bounded alias expansion, no recursion.

An organism.yaml may come from a ConfigMap someone else wrote, so reading it must not hang or
exhaust memory whatever its content: a YAML alias can stand for a whole subtree, and nested aliases
expand exponentially (a 511-byte "billion laughs" document names billions of nodes); an alias can
also name its own ancestor (an infinite document). Both are refused here, before any value is used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: Largest organism.yaml accepted (bytes). A ConfigMap holds at most 1 MiB.
MAX_CONFIG_BYTES = 1024 * 1024
#: Most YAML nodes a document may stand for once every alias is expanded.
MAX_NODES = 100_000
#: Deepest nesting of mappings and lists.
MAX_DEPTH = 64


def read_config_text(path: str | os.PathLike[str], field: str) -> str:
    """The UTF-8 text of a config file; every way it can be unreadable is a ConfigError naming `field`."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(field, f"{str(p)!r} is a directory", "the path of an organism.yaml file")
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(field, f"file {str(p)!r} does not exist") from None
    except OSError as e:  # symlink loop, permission denied, a FIFO gone away, ...
        raise ConfigError(field, f"cannot read {str(p)!r}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(field, f"{str(p)!r} is larger than {MAX_CONFIG_BYTES} bytes",
                          f"an organism.yaml of at most {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(field, f"{str(p)!r} is not UTF-8 text (byte {e.start})") from None


def compose(text: str, source: str | None = None) -> yaml.Node | None:
    """The YAML node tree of `text`, checked: at most MAX_CONFIG_BYTES, MAX_NODES nodes with aliases
    expanded, MAX_DEPTH levels, no alias inside its own anchor. Raises ConfigError('organism.yaml')."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError("organism.yaml", f"is {len(text)} characters long",
                          f"at most {MAX_CONFIG_BYTES}", source=source)
    try:
        _check_nesting(text, source)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError("organism.yaml", f"is not valid YAML: {getattr(e, 'problem', None) or e}",
                          line=(mark.line + 1) if mark else None, source=source) from None
    except RecursionError:
        raise ConfigError("organism.yaml", "is nested too deeply", f"at most {MAX_DEPTH} levels",
                          source=source) from None
    if root is not None:
        _check_tree(root, source)
    return root


_OPEN = (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken, yaml.BlockSequenceStartToken,
         yaml.BlockMappingStartToken)
_CLOSE = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)


def _check_nesting(text: str, source: str | None) -> None:
    """Refuse deep nesting from the token stream, before the (recursive) composer sees it: the
    scanner is iterative, so '[[[[...' costs a bounded look-ahead instead of a deep recursion."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError("organism.yaml", "is nested too deeply", f"at most {MAX_DEPTH} levels",
                                  line=token.start_mark.line + 1, source=source)
        elif isinstance(token, _CLOSE):
            depth -= 1


def _check_tree(root: yaml.Node, source: str | None) -> None:
    count = 0
    # Iterative walk over the expanded tree; `path` holds the ids of a node's ancestors, so an alias
    # of an ancestor (a recursive document) is seen on the way down.
    stack: list[tuple[yaml.Node, int, frozenset[int]]] = [(root, 1, frozenset())]
    while stack:
        node, depth, ancestors = stack.pop()
        count += 1
        line = node.start_mark.line + 1
        if count > MAX_NODES:
            raise ConfigError("organism.yaml", f"stands for more than {MAX_NODES} values once its aliases "
                              "are expanded", "write the values out, or use fewer aliases",
                              line=line, source=source)
        if depth > MAX_DEPTH:
            raise ConfigError("organism.yaml", "is nested too deeply", f"at most {MAX_DEPTH} levels",
                              line=line, source=source)
        if id(node) in ancestors:
            raise ConfigError("organism.yaml", "holds an alias inside its own anchor (a recursive "
                              "document)", "aliases of complete values only", line=line, source=source)
        children: list[Any]
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            continue
        inner = ancestors | {id(node)}
        stack.extend((child, depth + 1, inner) for child in children)


def load(text: str, source: str | None = None) -> tuple[yaml.Node | None, Any]:
    """(node tree, Python value) of a checked document."""
    root = compose(text, source)
    if root is None:
        return None, None
    try:
        # Loaded again from the text: constructing shares aliased values, so this is cheap now that
        # the expanded size is known to be bounded.
        return root, yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError("organism.yaml", f"is not valid YAML: {getattr(e, 'problem', None) or e}",
                          line=(mark.line + 1) if mark else None, source=source) from None

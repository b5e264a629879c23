"""Render a kustomization offline: exactly the kustomize features deploy/k8s uses.

    python deploy/k8s/render.py deploy/k8s/overlays/gpu     # prints the YAML stream

Supported: ``resources`` (YAML files and kustomization directories, built recursively),
``labels`` (without selectors, optionally on pod templates), ``secretGenerator`` (``envs``
and ``literals``) with ``generatorOptions`` (``disableNameSuffixHash: true``, ``labels``),
and ``patches`` in JSON6902 form (add, replace, remove) with a ``target`` kind and name.
Any other key is an error, so the manifests cannot use a feature this renderer would
silently ignore; tests/deploy/test_k8s.py checks the output against ``kubectl kustomize``.

An env file of a secretGenerator that is missing (admin.env, which git ignores) is an
error, unless the caller asks for its ``.example`` twin instead: the command line does,
and says so on stderr.
"""

from __future__ import annotations

import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "labels",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
# The kinds whose spec.template.metadata.labels kustomize's `includeTemplates: true` labels
# (a CronJob's templates sit elsewhere: refused).
TEMPLATE_KINDS = {"Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job"}

Object = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render as kustomize would."""


def render(path: Path, *, example_env: bool = False) -> list[Object]:
    """The objects that ``kubectl kustomize path`` prints, in kustomize's build order.

    ``example_env``: read ``FILE.example`` for a secretGenerator env file FILE that is
    missing (with a note on stderr) instead of failing.
    """
    root = Path(path)
    spec = _load_kustomization(root)
    objects: list[Object] = []
    for entry in spec.get("resources", []):
        objects.extend(_load_resource(root / entry, example_env))
    objects.extend(_generate_secrets(root, spec, example_env))
    for patch in spec.get("patches", []):
        _apply_patch(root, patch, objects)
    for label in spec.get("labels", []):
        _apply_labels(label, objects)
    _check_unique(objects, root)
    return objects


def _load_kustomization(root: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        if (root / name).is_file():
            spec = yaml.safe_load((root / name).read_text()) or {}
            break
    else:
        raise KustomizeError(f"{root}: no kustomization.yaml")
    unsupported = sorted(set(spec) - SUPPORTED_KEYS)
    if unsupported:
        raise KustomizeError(f"{root}: unsupported kustomization keys: {', '.join(unsupported)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{root}: kind {spec['kind']!r} is not Kustomization")
    return spec


def _load_resource(path: Path, example_env: bool) -> list[Object]:
    if path.is_dir():
        return render(path, example_env=example_env)
    if not path.is_file():
        raise KustomizeError(f"resource {path} is neither a file nor a directory")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _only(where: str, mapping: dict[str, Any], allowed: set[str]) -> None:
    unsupported = sorted(set(mapping) - allowed)
    if unsupported:
        raise KustomizeError(f"{where}: unsupported keys: {', '.join(unsupported)}")


def _generate_secrets(root: Path, spec: dict[str, Any], example_env: bool) -> list[Object]:
    generators = spec.get("secretGenerator", [])
    options = spec.get("generatorOptions", {})
    _only(f"{root}: generatorOptions", options, {"disableNameSuffixHash", "labels"})
    if generators and options.get("disableNameSuffixHash") is not True:
        # kustomize would add a content hash to the name and rewrite every reference.
        raise KustomizeError(f"{root}: secretGenerator needs disableNameSuffixHash: true")
    secrets = []
    for generator in generators:
        _only(f"{root}: secretGenerator", generator, {"name", "envs", "literals"})
        pairs = [_split_pair(literal, unquote=True) for literal in generator.get("literals", [])]
        for env in generator.get("envs", []):
            pairs.extend(_read_env_file(root / env, example_env))
        data = {key: base64.b64encode(value.encode()).decode() for key, value in pairs}
        metadata: Object = {"name": generator["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": metadata,
                "type": "Opaque",
                "data": data,
            }
        )
    return secrets


def _read_env_file(path: Path, example_env: bool) -> list[tuple[str, str]]:
    if not path.is_file() and example_env and path.with_name(path.name + ".example").is_file():
        print(f"render: {path} is missing, using {path.name}.example", file=sys.stderr)
        path = path.with_name(path.name + ".example")
    if not path.is_file():
        raise KustomizeError(f"env file {path} is missing (copy {path.name}.example?)")
    lines = (line.lstrip() for line in path.read_text().splitlines())
    return [_split_pair(line) for line in lines if line and not line.startswith("#")]


def _split_pair(text: str, unquote: bool = False) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KustomizeError(f"{text!r} is not KEY=VALUE")
    if unquote and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return key, value


def _apply_patch(root: Path, patch: dict[str, Any], objects: list[Object]) -> None:
    _only(f"{root}: patch", patch, {"target", "patch", "path"})
    target = patch.get("target", {})
    _only(f"{root}: patch target", target, {"kind", "name"})
    if "kind" not in target or "name" not in target:
        raise KustomizeError(f"{root}: a patch needs a target kind and name")
    text = patch["patch"] if "patch" in patch else (root / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise KustomizeError(f"{root}: only JSON6902 patches (a list of operations) are supported")
    matches = [
        obj
        for obj in objects
        if obj.get("kind") == target["kind"] and obj["metadata"]["name"] == target["name"]
    ]
    if not matches:
        raise KustomizeError(f"{root}: no {target['kind']} {target['name']} to patch")
    for obj in matches:
        for operation in operations:
            apply_json_patch_operation(obj, operation)


def apply_json_patch_operation(document: Object, operation: dict[str, Any]) -> None:
    """Apply one RFC 6902 add, replace or remove operation to ``document`` in place."""
    op, pointer = operation["op"], operation["path"]
    if op not in ("add", "replace", "remove"):
        raise KustomizeError(f"unsupported JSON patch operation {op!r}")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    if not tokens:
        raise KustomizeError(f"{op} {pointer!r}: the whole document cannot be patched")
    parent: Any = document
    try:
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        value = copy.deepcopy(operation.get("value"))
        if isinstance(parent, list):
            index = len(parent) if last == "-" and op == "add" else int(last)
            if op == "add":
                if index > len(parent):
                    raise IndexError(index)
                parent.insert(index, value)
            elif op == "replace":
                parent[index] = value
            else:
                del parent[index]
        elif op == "add":
            parent[last] = value
        else:
            if last not in parent:
                raise KeyError(last)
            if op == "replace":
                parent[last] = value
            else:
                del parent[last]
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise KustomizeError(f"{op} {pointer!r}: no such location ({exc!r})") from exc


def _apply_labels(label: dict[str, Any], objects: list[Object]) -> None:
    _only("labels", label, {"pairs", "includeSelectors", "includeTemplates"})
    if label.get("includeSelectors", False):
        raise KustomizeError("labels: includeSelectors: true is not supported")
    for obj in objects:
        targets = [obj.setdefault("metadata", {}).setdefault("labels", {})]
        if label.get("includeTemplates", False):
            if obj["kind"] == "CronJob":
                raise KustomizeError("labels: includeTemplates on a CronJob is not supported")
            if obj["kind"] in TEMPLATE_KINDS:
                template = obj["spec"]["template"].setdefault("metadata", {})
                targets.append(template.setdefault("labels", {}))
        for labels in targets:
            labels.update(label["pairs"])


def _check_unique(objects: list[Object], root: Path) -> None:
    seen = set()
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"), obj["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{root}: {key[1]} {key[2]} is defined twice")
        seen.add(key)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python deploy/k8s/render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        objects = render(Path(args[0]), example_env=True)
    except KustomizeError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

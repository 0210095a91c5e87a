"""The layout: no import cycle, no private import across modules, no long module, no variant named in bench/;
the command line's help and the read-only commands import no torch/accelerate/datasets; one registry."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench import variant_flags
from bench.cli import declarations
from bench.cli.flags import FLAGS, GROUPS
from bench.cli.main import COMMANDS
from bench.studies.recipes import load_recipe
from optimizers import available_optimizers, register
from optimizers.registry import is_sharpness_aware
from optimizers.sam import SAM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_structure  # noqa: E402


def test_the_layout_rules_hold():
    assert check_structure.violations() == []


def test_the_check_finds_what_it_looks_for(tmp_path, monkeypatch):
    """A planted cycle, private import, long module and variant name are each reported."""
    for package in check_structure.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "bench" / "a.py").write_text("from bench.b import _hidden\n")
    (tmp_path / "bench" / "b.py").write_text("from bench import a\n_hidden = 1\n" + "x = 1\n" * 400)
    (tmp_path / "bench" / "c.py").write_text('CHOICE = "gsam"\n')
    monkeypatch.setattr(check_structure, "ROOT", tmp_path)
    found = "\n".join(check_structure.violations())
    assert "import cycle: bench.a -> bench.b -> bench.a" in found
    assert "private import: bench.a imports bench.b._hidden" in found
    assert "long module: bench.b: 402 lines" in found
    assert "bench.c:1 names the variant 'gsam'" in found


def _imported(code: str) -> set[str]:
    """The top-level modules among torch, accelerate, datasets, pandas and matplotlib that ``code`` imports."""
    probe = (
        code
        + "\nimport sys; print(' '.join(m for m in ('torch', 'accelerate', 'datasets', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_help_imports_nothing_heavy():
    """``launch.py --help`` answers from the flag table: no torch, accelerate, datasets, pandas or matplotlib."""
    code = (
        "import contextlib, io\nfrom bench.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main(['--help'])\n    except SystemExit:\n        pass"
    )
    assert _imported(code) == set()


@pytest.mark.parametrize("module", ["bench.report.runs", "bench.report.tables", "bench.cli.reports"])
def test_reading_results_imports_no_accelerate_or_datasets(module):
    """``table``, ``reproduction`` and ``variants`` (bench.cli.reports) and the modules that read run files."""
    assert not _imported(f"import {module}") & {"accelerate", "datasets"}


def test_help_names_every_subcommand_and_groups_every_flag():
    done = subprocess.run([sys.executable, "launch.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    text = done.stdout
    assert done.returncode == 0
    assert all(f"launch.py {command}" in text for command in COMMANDS)
    assert all(f"\n{title}:" in text for title in GROUPS.values())
    assert all(flag.name in text for flag in FLAGS)
    variants = text[text.index("\nvariant settings:") :]
    assert all(f"  {name}: --" in variants for name in declarations.load()["variants"])


def test_the_declarations_file_matches_the_registries():
    """declarations.json is what ``launch.py variants --json`` prints from the declarations."""
    assert declarations.to_json(declarations.from_declarations()) == declarations.JSON_PATH.read_text()
    done = subprocess.run(
        [sys.executable, "launch.py", "variants", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout == declarations.JSON_PATH.read_text(), done.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ('[no_such]\nrho = { flag = "x" }', r"\[no_such\]: no optimizer registered as 'no_such'"),
        ("[bayesian_sam]\nlr = { cli = false }", r"write its registered name, \[bsam\]"),
        ('[gsam]\nbeta = { flag = "x" }', r"\[gsam\] beta: gsam declares no such setting"),
        ('[sam]\nrho = { flags = "x" }', r"\[sam\] rho: unknown key 'flags'"),
        ('[sam]\nrho = { selects = "gsam" }', r"\[sam\] rho: selects needs a boolean setting"),
        ('[arwp]\ntotal_steps = { filled_by = "epochs" }', r"filled_by must be one of num_train, total_steps"),
        ('[gsam]\nalpha = { flag = "rho" }', r"gsam: --rho would set both rho and alpha"),
    ],
)
def test_a_bad_variant_flags_entry_is_refused_in_one_line(text, message):
    with pytest.raises(variant_flags.VariantFlagsError, match=message) as err:
        variant_flags.parse(text)
    assert "\n" not in str(err.value) and str(err.value).startswith("variant_flags.toml: ")


def test_a_variant_flags_entry_holds_where_its_setting_is_inherited(monkeypatch):
    """look_layer_sam inherits looksam's settings, so looksam's spellings; gsam declares its own
    ``adaptive``, so sam's ``selects`` is not its."""
    table = variant_flags.parse('[looksam]\nk = { flag = "look_k" }\n[sam]\nadaptive = { selects = "adaptive_sam" }')
    monkeypatch.setattr(variant_flags, "table", lambda: table)
    for name in ("looksam", "look_layer_sam"):
        assert "look_k" in variant_flags.setting_flags(name) and "k" not in variant_flags.setting_flags(name)
    assert variant_flags.selects("sam", "adaptive") == "adaptive_sam"
    assert variant_flags.selects("gsam", "adaptive") is None and "adaptive" in variant_flags.setting_flags("gsam")


def test_registering_a_taken_name_or_alias_is_an_error():
    before = available_optimizers()
    for name, aliases in (("sam", ()), ("SAM", ()), ("my_sam", ("bayesian-sam",))):
        with pytest.raises(ValueError, match="already registered"):
            register(name, SAM, aliases=aliases)
    assert available_optimizers() == before


def test_the_default_suite_covers_the_registry():
    """A new variant joins the default suite (its grid asks for every registered variant)."""
    grid = load_recipe("digits").grid["optimizer"]
    assert grid == ["sgd", *[n for n in available_optimizers() if is_sharpness_aware(n)]]

"""Parsers of option values shared by several commands (train, sweep): one-line errors naming the option."""

from __future__ import annotations

import json
from typing import Optional, Union

import typer

from stratalign.core.metric_registry import select_metrics
from stratalign.errors import StratalignError


def trainer_overrides(pairs: list[str]) -> tuple:
    """--set key=value training overrides (values parsed as JSON when they can be)."""
    out = []
    for item in pairs:
        if "=" not in item:
            raise StratalignError(f"--set takes key=value, not {item!r}")
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), json.loads(v)))
        except json.JSONDecodeError:
            out.append((k.strip(), v))
    return tuple(out)


def n_pairs(value: Optional[str]) -> Optional[int]:
    """--n-pairs: an integer, or 'all' (None: the whole train pool)."""
    if value in (None, "all"):
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"expected an integer or 'all', not {value!r}") from None


def check_n_pairs(value: Union[str, list[str], None]) -> Union[str, list[str], None]:
    """Option callback: a malformed --n-pairs is a usage error (usage line, exit 2) before anything runs."""
    for item in value if isinstance(value, list) else [value]:
        n_pairs(item)
    return value


# = stratalign.train.presets.PRESET_NAMES, spelt out so that `--help` does not import the trainer (torch);
# tests/cli/test_main.py checks that the two agree
PRESET_HELP = ("Trainer schedule: auto (cpu without CUDA, gpu with it), cpu (batch 256, 600 steps), gpu, "
               "paper (docs/method.md published schedule: batch 4096, 3000 steps). --set overrides any one setting.")


SELECT_CHOICES = tuple(select_metrics())  # core.metric_registry (pure data: a light --help)
SELECT_HELP = ("Validation metric that picks the restored checkpoint (docs/method.md § 3.8): rsum (R@1+R@5+R@10 both ways, "
               "default), zeroshot (top-1; needs labels) or clip_loss. CoMM and CSA have their own rule.")
TUNE_HELP = ("Choose the objective's knobs on validation (docs/method.md § 3.9): one run per value of its grid (lambda, beta, "
             "CSA k x ridge), the best by the --select metric; the grid's validation scores are kept with the run.")


def check_select(value: Optional[str]) -> Optional[str]:
    """Option callback: an unknown --select is a usage error (exit 2) before anything runs."""
    if value is not None and value not in SELECT_CHOICES:
        raise typer.BadParameter(f"expected one of {', '.join(SELECT_CHOICES)}, not {value!r}")
    return value


VALIDATION_HELP = ("Validation pairs (docs/method.md § 3.8): auto (a cell: the dataset's val split when it has at "
                   "least 100 pairs, else kfold; a lone run without --tune: the val split, else carve), split, carve "
                   "(10 % of the train split's images) or kfold (k-fold cross-validation over the training pairs, "
                   "then a refit on all of them).")
FOLDS_HELP = "k of --validation kfold (folds by image, or by group where the dataset names groups)."


def check_validation(value: str) -> str:
    """Option callback: an unknown --validation is a usage error (exit 2) before anything runs."""
    from stratalign.stages.subsets import VALIDATION_CHOICES

    if value not in VALIDATION_CHOICES:
        raise typer.BadParameter(f"expected one of {', '.join(VALIDATION_CHOICES)}, not {value!r}")
    return value


def check_folds(value: int) -> int:
    """Option callback: --folds below 2 is a usage error (exit 2)."""
    if value < 2:
        raise typer.BadParameter(f"k-fold needs at least 2 folds, not {value}")
    return value


def check_preset(value: str) -> str:
    """Option callback: an unknown --preset is one error line (exit 2) before anything runs."""
    from stratalign.train.presets import check_preset_name

    return check_preset_name(value)

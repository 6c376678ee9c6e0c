"""UCI Census-Income (KDD) → recsys_mtl dataset (the MMoE / PLE / CSRec / MPT-Rec benchmark).

Raw format: ``census-income.data`` (199,523 rows) and ``census-income.test`` (99,762 rows),
optionally ``.gz``; 42 comma-space separated fields per line, no header. Field 24 (0-based) is
the instance weight, the last field the income class (``- 50000.`` / ``50000+.``).

Tasks (all binary, defined on every row):

* ``income`` — 1 iff the last field is ``50000+.``;
* ``marital`` — 1 iff marital status is ``Never married`` (MMoE paper's second task);
* ``education`` (optional, ``--tasks income,marital,education``; the extra task MPT-Rec adds to
  a pre-trained model) — 1 iff education is a bachelor's, master's, professional-school or
  doctorate degree ("education >= bachelors").

Features: the 33 categorical columns → single-valued sparse features (per-column vocabulary,
``min_count`` threshold), minus the column a selected task is computed from (``marital_stat`` for
``marital``, ``education`` for ``education``); the 7 continuous columns → dense float32:
``log1p`` for wage per hour, capital gains, capital losses and dividends, then every dense
feature standardised with train mean/std. The instance weight is not a feature; with
``keep_weight`` it is written as an extra ``instance_weight`` column outside the schema. All
features describe the person (side ``user``) except ``year`` (``context``); there is no id
column, so ``user_id_feature`` is unset.

Split: files named ``*.data*`` → train, ``*.test*`` → eval (the standard split; the MMoE paper
further halves the test file into validation/test, which a user can do on the eval split). Any
other file (such as the 1,000-row sample) is split per row: eval iff
``splitmix64(row index; seed) < eval_fraction``, the row index counting lines across that
class of inputs in the given order. The vocabularies and statistics come from train rows only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_mtl.data.convert.common import (
    Chunk,
    ConvertError,
    FeatureSpec,
    Source,
    hash_eval_mask,
    log1p_nonneg,
    parse_tasks,
    read_csv_chunks,
    strings,
)

COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains", "capital_losses",
    "dividends_from_stocks", "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
)  # fmt: skip
assert len(COLUMNS) == 42
LOG_DENSE = ("wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks")
DENSE = ("age", *LOG_DENSE, "num_persons_worked_for_employer", "weeks_worked_in_year")
CATEGORICAL = tuple(c for c in COLUMNS if c not in DENSE and c not in ("instance_weight", "income"))
TASKS = ("income", "marital", "education")
DEFAULT_TASKS = ("income", "marital")
TASK_SOURCE_COLUMN = {"marital": "marital_stat", "education": "education"}
HIGHER_EDUCATION = (
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)


class CensusKDD(Source):
    name = "census-kdd"

    def __init__(self, inputs: Sequence[str | Path], *, tasks: str | Sequence[str] | None = None,
                 eval_fraction: float = 0.1, seed: int = 0, max_rows: int | None = None,
                 keep_weight: bool = False) -> None:
        self.inputs = [Path(p) for p in inputs]
        if not self.inputs:
            raise ConvertError("census-kdd: no input files")
        self.tasks = parse_tasks(tasks, TASKS, DEFAULT_TASKS)
        self.eval_fraction, self.seed, self.max_rows, self.keep_weight = eval_fraction, seed, max_rows, keep_weight
        dropped = {TASK_SOURCE_COLUMN[t] for t in self.tasks if t in TASK_SOURCE_COLUMN}
        self.categorical = tuple(c for c in CATEGORICAL if c not in dropped)

    @staticmethod
    def split_of(path: Path) -> str:
        name = path.name
        if ".data" in name:
            return "train"
        if ".test" in name:
            return "eval"
        return "hash"

    def spec(self, feature: str) -> FeatureSpec:
        return FeatureSpec(side="context" if feature == "year" else "user")

    def feature_order(self, names: list[str]) -> list[str]:
        return [c for c in self.categorical if c in names]

    def metadata(self) -> dict:
        return {
            "inputs": [str(p) for p in self.inputs],
            "split": "files named *.data* -> train, *.test* -> eval; other files: eval iff "
                     f"splitmix64(row index; seed={self.seed}) < eval_fraction={self.eval_fraction}",
            "tasks": {"income": "1 iff income field is '50000+.'",
                      "marital": "1 iff marital status is 'Never married'",
                      "education": "1 iff education is bachelors, masters, prof school or doctorate"},
            "dense_transform": {**{c: "log1p then standardise" for c in LOG_DENSE},
                                **{c: "standardise" for c in DENSE if c not in LOG_DENSE}},
            "max_rows_per_file": self.max_rows,
        }

    def chunks(self, pass_index: int) -> Iterator[Chunk]:
        hashed_rows = 0
        for path in self.inputs:
            split = self.split_of(path)
            for raw in read_csv_chunks(path, column_names=list(COLUMNS), delimiter=",", quoting=False,
                                       max_rows=self.max_rows):
                n = raw.num_rows
                if split == "hash":
                    is_eval = hash_eval_mask(np.arange(hashed_rows, hashed_rows + n), self.eval_fraction, self.seed)
                    hashed_rows += n
                else:
                    is_eval = np.full(n, split == "eval")
                t = raw.table
                cat = {c: strings(t.column(c)) for c in self.categorical}
                dense = {}
                for c in DENSE:
                    x = np.asarray(raw.numeric(c).fill_null(np.nan), np.float64)
                    dense[c] = log1p_nonneg(x) if c in LOG_DENSE else x
                income = strings(t.column("income"))
                pos = np.asarray(pc.equal(income, "50000+.").fill_null(False))
                neg = np.asarray(pc.equal(income, "- 50000.").fill_null(False))
                if not (pos | neg).all():
                    i = int(np.flatnonzero(~(pos | neg))[0])
                    raise ConvertError(f"{raw.where(i)}: income field must be '- 50000.' or '50000+.', "
                                       f"got {income[i].as_py()!r}")
                y_income = pos.astype(np.float32)
                labels = {"income": y_income}
                if "marital" in self.tasks:
                    labels["marital"] = np.asarray(
                        pc.equal(strings(t.column("marital_stat")), "Never married").fill_null(False), np.float32)
                if "education" in self.tasks:
                    labels["education"] = np.asarray(
                        pc.is_in(strings(t.column("education")), value_set=pa.array(HIGHER_EDUCATION)), np.float32)
                extra = {}
                if self.keep_weight:
                    extra["instance_weight"] = pc.cast(raw.numeric("instance_weight"), pa.float32())
                yield Chunk(is_eval=is_eval, sparse=cat, dense=dense,
                            labels={k: labels[k] for k in self.tasks}, extra=extra)

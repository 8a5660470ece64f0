"""The 1-way k-shot protocol: which supports each query gets, as units of work.

Rules (see ``docs/evaluation.md``):

* every organ is its own 1-way task; a (query, organ) pair is evaluated only when the query's
  label map contains the organ;
* the support set is split by modality: each query is evaluated once per support modality
  (one *direction* each, e.g. a CT+MR support set gives CT->MRI and MRI->MRI for an MR query);
* the *eligible* supports of a query for an organ are the support cases whose label map contains
  the organ, minus the query itself (same image file) and minus every case of the query's
  subject (when both have subject ids and come from the same dataset);
* draw ``d`` of (query, support modality) is a random permutation of the support cases that may
  serve the query, seeded by ``(seed, query, support modality, d)``; for each organ, its k-shot
  supports are the first k cases of that permutation that contain the organ. So the supports of
  a smaller k are contained in those of a larger k, organs share supports where they can (one
  registration per support/query pair serves every organ), and adding queries, organs, shots or
  draws never changes the other draws.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from spasem.core.cache import make_key


@dataclass(frozen=True)
class CaseRef:
    """One case of a dataset, with absolute paths (picklable; sent to workers).

    :param dataset: dataset key: the manifest's ``dataset`` name, else the manifest's path;
        subject ids are compared only between cases of one dataset key.
    :param label_ids: organ name -> label id in this case's label map.
    """

    id: str
    image: str
    label: str
    modality: str | None
    subject: str | None
    dataset: str
    label_ids: tuple[tuple[str, int], ...] = field(default=())

    def label_id(self, organ: str) -> int:
        return dict(self.label_ids)[organ]


def modality_name(modality: str | None) -> str:
    """Display name of a modality in directions: 'CT', 'MRI', or '?' when unknown."""
    if modality is None:
        return "?"
    return {"MR": "MRI"}.get(modality, modality)


def direction_of(support_modality: str | None, query_modality: str | None) -> str:
    """``'CT->MRI'`` and the like."""
    return f"{modality_name(support_modality)}->{modality_name(query_modality)}"


def excluded(support: CaseRef, query: CaseRef) -> bool:
    """True when ``support`` may not serve ``query``: the same image, or the same subject of
    the same dataset."""
    if support.image == query.image:
        return True
    if support.dataset == query.dataset and support.id == query.id:
        return True
    return bool(support.subject and query.subject and support.dataset == query.dataset and support.subject == query.subject)


def _seed_words(text: str) -> list[int]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def draw_order(candidates: Sequence[CaseRef], seed: int, query: CaseRef, draw: int) -> list[CaseRef]:
    """The seeded random permutation of ``candidates`` (the supports of one modality that may
    serve ``query``) for draw ``draw``. Independent of the order ``candidates`` come in."""
    pool = sorted(candidates, key=lambda c: (c.dataset, c.id))
    group = modality_name(pool[0].modality) if pool else ""
    words = _seed_words(f"{query.dataset}\x00{query.id}\x00{group}\x00{draw}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]))
    return [pool[i] for i in rng.permutation(len(pool))]


def draw_supports(order: Sequence[CaseRef], organ: str, shots: int, present: dict[str, set[int]]) -> tuple[CaseRef, ...]:
    """The first ``shots`` cases of a draw's permutation whose label map contains ``organ``."""
    return tuple([c for c in order if c.label_id(organ) in present.get(c.label, set())][:shots])


def by_modality(supports: Iterable[CaseRef]) -> dict[str, list[CaseRef]]:
    """Support cases grouped by modality (display name: 'CT', 'MRI', '?'), in a stable order."""
    groups: dict[str, list[CaseRef]] = {}
    for case in supports:
        groups.setdefault(modality_name(case.modality), []).append(case)
    return dict(sorted(groups.items()))


@dataclass(frozen=True)
class Method:
    """One configuration under evaluation (a preset plus overrides) and its fusion strategies.

    :param config: :class:`~spasem.core.config.PipelineConfig` as a JSON-able dict.
    :param fusions: fusion stages ``{"name": ..., "options": {...}}``, decoded once each per unit.
    """

    name: str
    config: dict
    fusions: tuple[dict, ...]

    @property
    def fusion_names(self) -> list[str]:
        return [f["name"] for f in self.fusions]

    @property
    def digest(self) -> str:
        """Digest of everything that changes its results (the device and the fusions excluded)."""
        relevant = {k: v for k, v in self.config.items() if k not in ("device", "mixed_precision", "fusion")}
        return make_key("method", relevant)


@dataclass(frozen=True)
class Unit:
    """One (method, query, organ, shots, draw): registration/features once, then every fusion."""

    method: Method
    query: CaseRef
    organ: str
    shots: int
    draw: int
    supports: tuple[CaseRef, ...]

    @property
    def direction(self) -> str:
        return direction_of(self.supports[0].modality, self.query.modality)

    @property
    def stem(self) -> str:
        """``liver_CT_to_MRI_k2_d0``: readable name of the unit within its method and query."""
        return f"{self.organ}_{self.direction.replace('->', '_to_').replace('?', 'unknown')}_k{self.shots}_d{self.draw}"

    @property
    def key(self) -> str:
        """Relative path of the unit's result file: readable, plus a digest of its inputs."""
        digest = make_key("unit", self.method.digest, self.query.image, self.query.label, self.query.label_id(self.organ),
                          [(s.image, s.label, s.label_id(self.organ)) for s in self.supports])[:12]
        return f"{_safe(self.method.name)}/{_safe(self.query.id)}/{self.stem}_{digest}.json"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


@dataclass
class Plan:
    """Units to run, and (query, organ) pairs left out because the query lacks the organ."""

    units: list[Unit]
    skipped: list[dict]

    def groups(self, units: Sequence[Unit] | None = None) -> list[tuple[Unit, ...]]:
        """``units`` (default: all) grouped by (method, query, support modality, shots, draw):
        the organs of one draw, run together so their supports' registrations are computed once."""
        grouped: dict[tuple, list[Unit]] = {}
        for unit in self.units if units is None else units:
            key = (unit.method.name, unit.query.dataset, unit.query.id, unit.direction, unit.shots, unit.draw)
            grouped.setdefault(key, []).append(unit)
        return [tuple(g) for g in grouped.values()]


def plan_units(
    methods: Sequence[Method],
    supports: Sequence[CaseRef],
    queries: Sequence[CaseRef],
    organs: Sequence[str],
    shots: Sequence[int],
    draws: int,
    seed: int,
    present: dict[str, set[int]],
) -> Plan:
    """All units of the protocol, ordered by query (so a worker's caches see one query at a time).

    :param present: label file path -> label ids present in it.
    :raises ValueError: a query has fewer eligible supports than ``max(shots)`` (callers check
        this first with :func:`pool_shortfalls` to report every problem at once).
    """
    units: list[Unit] = []
    skipped: list[dict] = []
    groups = by_modality(supports)
    for query in queries:
        wanted = []
        for organ in organs:
            if query.label_id(organ) in present.get(query.label, set()):
                wanted.append(organ)
            else:
                skipped.append({"query": query.id, "organ": organ, "reason": "the query's label map lacks the organ"})
        for group in groups.values():
            candidates = [s for s in group if not excluded(s, query)]
            for draw in range(draws):
                order = draw_order(candidates, seed, query, draw)
                for k in shots:
                    for method in methods:
                        for organ in wanted:
                            chosen = draw_supports(order, organ, k, present)
                            if len(chosen) < k:
                                raise ValueError(f"query {query.id}, organ {organ}: {len(chosen)} eligible supports < {k}")
                            units.append(Unit(method, query, organ, k, draw, chosen))
    return Plan(units, skipped)


def eligible_supports(supports: Iterable[CaseRef], query: CaseRef, organ: str, present: dict[str, set[int]]) -> list[CaseRef]:
    """Supports whose label map holds ``organ`` and that may serve ``query`` (:func:`excluded`)."""
    return [s for s in supports if not excluded(s, query) and s.label_id(organ) in present.get(s.label, set())]


def pool_shortfalls(
    supports: Sequence[CaseRef], queries: Sequence[CaseRef], organs: Sequence[str], shots: Sequence[int], present: dict[str, set[int]]
) -> list[str]:
    """One message per (organ, support modality) for the queries that have fewer eligible
    supports than ``max(shots)``."""
    need = max(shots)
    problems = []
    groups = by_modality(supports)
    for organ in organs:
        for modality, group in groups.items():
            short = []
            for query in queries:
                if query.label_id(organ) not in present.get(query.label, set()):
                    continue
                n = len(eligible_supports(group, query, organ, present))
                if n < need:
                    short.append(f"{query.id} ({n})")
            if short:
                listed = ", ".join(short[:8]) + (f" and {len(short) - 8} more" if len(short) > 8 else "")
                where = f" {modality}" if len(groups) > 1 else ""
                problems.append(
                    f"organ {organ}: {len(short)} quer{'y has' if len(short) == 1 else 'ies have'} fewer than {need} "
                    f"eligible{where} support(s) with it (--shots {need}): {listed}; eligible = support cases containing "
                    "the organ, not the query itself nor its subject"
                )
    return problems

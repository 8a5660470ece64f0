"""The evaluation's per-task registration memo (spasem.evaluation.worker.PairMemo) with backends
that do and do not refine around the support's structure (``uses_support_mask``)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

import spasem
from spasem.core.backends import RegistrationBackend, SitkTransform
from spasem.core.pipeline import Backends, create_backends, make_context
from spasem.core.config import build_config
from spasem.evaluation.worker import PairMemo
from tests.conftest import blob_pair


class Recording(RegistrationBackend):
    name = "recording"
    uses_support_mask = True

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self.calls: list[tuple[int, int, int | None]] = []

    def register(self, support, query, support_mask=None):
        self.calls.append((id(support), id(query), None if support_mask is None else id(support_mask)))
        return SitkTransform(sitk.TranslationTransform(3))


class PairOnly(Recording):
    name = "pair-only"
    uses_support_mask = False

    def register(self, support, query):
        self.calls.append((id(support), id(query), None))
        return SitkTransform(sitk.TranslationTransform(3))


def test_mask_refining_backend_gets_the_mask_and_each_mask_is_its_own_entry(blob):
    image, mask = blob
    other_mask = mask.with_array(np.roll(mask.array, 2, axis=0))
    inner = Recording()
    memo = PairMemo(inner)
    assert memo.uses_support_mask
    first = memo.register(image, image, support_mask=mask)
    assert memo.register(image, image, support_mask=mask) is first  # same pair and mask: reused
    memo.register(image, image, support_mask=other_mask)  # another structure: registered again
    assert inner.calls == [(id(image), id(image), id(mask)), (id(image), id(image), id(other_mask))]
    assert (memo.computed, memo.reused) == (2, 1)


def test_pair_only_backend_is_called_without_a_mask_and_once_per_pair(blob):
    image, mask = blob
    inner = PairOnly()
    memo = PairMemo(inner)
    assert not memo.uses_support_mask
    first = memo.register(image, image, support_mask=mask)
    assert memo.register(image, image) is first
    assert inner.calls == [(id(image), id(image), None)]
    assert (memo.computed, memo.reused) == (1, 1)


def test_engine_runs_with_the_memo_in_place_of_a_mask_refining_backend(blob, fast_config):
    """The engine passes ``support_mask=`` to backends that ask for it, through the memo too."""
    image, mask = blob
    config = build_config(fast_config)
    context = make_context(config)
    backends = create_backends(config, context)
    inner = Recording(context=context)
    shared = Backends(PairMemo(inner), backends.encoder, backends.fusion, backends.decoder)
    result = spasem.segment([(image, mask)], image, config, backends=shared)
    assert result.mask.array.any()
    assert len(inner.calls) == 1 and inner.calls[0][2] is not None

"""A rotated float model computes what the original computes: every stage, tiny model and trained model."""

import copy

import pytest
import torch

from spinquant.fusion import Rotations, apply_rotations, fuse_norms, norms_are_fused
from spinquant.formats import load_model
from spinquant.formats.hf import untie_embeddings
from tests.helpers import rel_diff

STAGES = {"norm fusion": dict(r1=False, r2=False, r4=False), "+R1": dict(r1=True, r2=False, r4=False),
          "+R1+R2": dict(r1=True, r2=True, r4=False), "+R1+R2+R4": dict(r1=True, r2=True, r4=True)}


def _check_all_stages(model, ids, tol=1e-4):
    with torch.no_grad():
        ref = model(ids).logits
        for stage, flags in STAGES.items():
            m = copy.deepcopy(model)
            fuse_norms(m)
            assert norms_are_fused(m)
            apply_rotations(m, Rotations.random_hadamard(m, seed=3, **flags))
            err = rel_diff(m(ids).logits, ref)
            assert err < tol, f"{stage}: relative logit difference {err:.2e}"


def test_tiny_model_all_stages(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight  # tied, like Llama 3.2 1B/3B
    untie_embeddings(tiny_model)
    assert tiny_model.lm_head.weight is not tiny_model.model.embed_tokens.weight
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 33))
    _check_all_stages(tiny_model, ids)


def test_rotation_really_changes_weights(tiny_model):
    untie_embeddings(tiny_model)
    m = copy.deepcopy(tiny_model)
    fuse_norms(m)
    apply_rotations(m, Rotations.random_hadamard(m, seed=0))
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert not torch.allclose(m.state_dict()[name], tiny_model.state_dict()[name])


def test_trained_reference_model_all_stages(ref_model_dir):
    model = load_model(ref_model_dir)  # hidden 384 = 12 * 32: a Paley-based R1
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    _check_all_stages(model, ids)


def test_rotation_needs_fused_norms(tiny_model):
    from spinquant.errors import SpinQuantError

    untie_embeddings(tiny_model)
    with pytest.raises(SpinQuantError, match="fuse_norms"):
        apply_rotations(tiny_model, Rotations.random_hadamard(tiny_model, seed=0))

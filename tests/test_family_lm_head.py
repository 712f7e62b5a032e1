"""napo's fused LM head against each family's own head: the same sequence log-probs and gradients, whatever the
config says about logit transforms the class never applies; and where a class does transform its logits (Gemma 3's
text-only model soft-caps them), napo scores the model's own logits and says so once."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

from PIL import Image  # noqa: E402

from napo.data.tiny import make_tiny_model  # noqa: E402
from napo.data.tiny_families import FAMILIES, make_tiny_family_model  # noqa: E402
from napo.logps import fused_linear_sequence_logps, sequence_logps  # noqa: E402
from napo.models.processors import load_processor  # noqa: E402
from napo.train import lm_head  # noqa: E402
from napo.train.collator import NaPOVisionCollator  # noqa: E402
from napo.train.lm_head import add_napo_lm_head  # noqa: E402

ALL = ["llava", *FAMILIES]
COLUMNS = ("chosen", "rejected", "question_only", "image_only")
# Every transform napo knows, at values that would change the logits if a class applied them.
TRANSFORMS = {"final_logit_softcapping": 0.5, "logit_scale": 3.0, "logits_scaling": 4.0}


def picture(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 40, 200))
    image.paste((220, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    return image


ROWS = [
    dict(idx=0, image=picture(70, 45), question="What color is the cube?", chosen="The cube is red.",
         rejected="The cube is blue.", question_only="It is green.", image_only="A red square."),
    dict(idx=1, image=picture(30, 90), question="Is there a ball?", chosen="No.", rejected="Yes, a ball.",
         question_only="Yes.", image_only="A blue picture."),
]  # fmt: skip


# Tiny models gain nothing from threads; on a busy machine their spinning slowed these modules many times.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(arch)``: ``(model, batch)``, a tiny checkpoint and napo's NaPO batch (K=4, two rows) for it."""
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("heads")
    built: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in built:
            path = make_tiny_model(root / arch) if arch == "llava" else make_tiny_family_model(arch, root / arch)
            model = AutoModelForImageTextToText.from_pretrained(path)
            batch = NaPOVisionCollator(load_processor(path), columns=COLUMNS)(ROWS)
            built[arch] = (model, batch)
        return built[arch]

    return get


def with_transforms(model):
    """A copy of ``model`` whose config and text config carry every logit transform."""
    changed = copy.deepcopy(model)
    for config in {id(c): c for c in (changed.config, changed.config.get_text_config())}.values():
        for name, value in TRANSFORMS.items():
            setattr(config, name, value)
    return changed


def scores(model, batch, *, patched: bool):
    """``(logps [K*B], gradients by parameter name)`` of the batch's completions: through napo's patched forward,
    or plain torch on the model's own logits."""
    model.train()
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask" and not k.startswith("ref_")}
    if patched:
        logps = model(**inputs, labels=labels, napo_logps=True).logps
    else:
        logits = model(**inputs).logits.double()
        token = torch.log_softmax(logits[:, :-1], -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
        logps = (token * (labels[:, 1:] != -100)).sum(1)
    logps.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach().float(), grads


@pytest.mark.parametrize("arch", ALL)
def test_fused_head_gives_the_models_own_logps_and_gradients(family, arch, monkeypatch):
    """Each family's class ignores every logit transform its configs could carry (each computes lm_head(hidden) and
    nothing after), so napo keeps its fused kernel there, silently, and it matches the model's own logits."""
    monkeypatch.setattr(lm_head, "_TOLD_OWN_HEAD", set())
    model, batch = family(arch)
    transformed = with_transforms(model)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():  # the class really ignores them: its logits are unchanged
        torch.testing.assert_close(transformed.eval()(**inputs).logits, model.eval()(**inputs).logits)
    own_logps, own_grads = scores(transformed, batch, patched=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: the fused head applies
        assert lm_head._fused_head_applies(transformed)
        patched = add_napo_lm_head(copy.deepcopy(transformed))
    calls = []
    monkeypatch.setattr(lm_head, "fused_linear_sequence_logps", lambda *a, **k: calls.append(1) or fused(*a, **k))
    fused_logps, fused_grads = scores(patched, batch, patched=True)
    assert calls, "the fused kernel ran"
    torch.testing.assert_close(fused_logps, own_logps, rtol=1e-5, atol=1e-4)
    assert own_grads.keys() == fused_grads.keys()
    for name, grad in own_grads.items():
        # Relative to the tensor's largest entry, with a floor for gradients that are mathematically zero (attention
        # key biases: rounding noise near 1e-10 on both sides).
        atol = 1e-4 * grad.abs().max().item() + 1e-7
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=atol, msg=name)


fused = fused_linear_sequence_logps


@pytest.fixture(scope="module")
def gemma3_text(tmp_path_factory):
    """A tiny Gemma3ForCausalLM (the text-only class) that soft-caps its logits at 0.5, and token ids."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=0.5, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    ids = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_gemma3_text_model_soft_caps_so_napo_scores_its_own_logits_and_says_so_once(gemma3_text, monkeypatch):
    monkeypatch.setattr(lm_head, "_TOLD_OWN_HEAD", set())
    model, ids = gemma3_text
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        own = model(input_ids=ids).logits
        linear = hidden @ model.lm_head.weight.T
        assert not torch.allclose(own, linear, atol=1e-3), "the class soft-caps: its logits are not the linear map"
        torch.testing.assert_close(own, 0.5 * torch.tanh(linear / 0.5))
        expected = sequence_logps(own, labels)
        # What the fused kernel alone would give: another number, hence the fallback.
        assert not torch.allclose(fused(hidden, model.lm_head.weight, labels)[0], expected[0], atol=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = add_napo_lm_head(copy.deepcopy(model))
        second = add_napo_lm_head(copy.deepcopy(model))  # another model of the class: no second notice
        add_napo_lm_head(first)  # patching again changes nothing
        with torch.no_grad():
            outputs = [m(input_ids=ids, labels=labels, napo_logps=True) for m in (first, second, first)]
    notices = [str(w.message) for w in caught if "napo" in str(w.message)]
    assert len(notices) == 1, notices
    assert "Gemma3ForCausalLM" in notices[0] and "final_logit_softcapping=0.5" in notices[0]
    for out in outputs:
        torch.testing.assert_close(out.logps, expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.avg_logps, expected[1], rtol=1e-5, atol=1e-5)


def test_a_class_napo_has_not_read_falls_back_on_its_config_or_text_config(monkeypatch):
    """Outside the classes napo has read, a transform in the model's config or its text config (PaliGemma and
    Gemma 4 apply their text config's soft-capping) sends the model to its own head; none keeps the fused one."""
    from types import SimpleNamespace

    monkeypatch.setattr(lm_head, "_TOLD_OWN_HEAD", set())

    class Unknown:
        def __init__(self, top: dict, text: dict):
            self.config = SimpleNamespace(**top, get_text_config=lambda: SimpleNamespace(**text))

    assert lm_head._fused_head_applies(Unknown({}, {}))
    assert lm_head._fused_head_applies(Unknown({"logit_scale": 1.0}, {"final_logit_softcapping": None}))
    with pytest.warns(UserWarning, match=r"Unknown .*final_logit_softcapping=30"):
        assert not lm_head._fused_head_applies(Unknown({}, {"final_logit_softcapping": 30.0}))
    with pytest.warns(UserWarning, match=r"logits_scaling=8"):
        assert not lm_head._fused_head_applies(Unknown({"logits_scaling": 8}, {}))

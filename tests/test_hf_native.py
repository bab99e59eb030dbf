"""A deployed anchor is a plain transformers model with the task's labels: it loads without esta."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from helpers import build, perturb_adapters, toy_task

from esta.deploy import DeployedStitch


def test_a_deployed_anchor_loads_with_plain_transformers_and_equals_esta(tmp_path, vit_family):
    data = toy_task()
    palette, _ = build(vit_family[:2], data)
    perturb_adapters(palette)
    sid = next(s.id for s in palette.space.stitches if s.is_anchor)
    classes = ["dark", "mid", "bright"]
    DeployedStitch.from_palette(palette, sid, meta={"classes": classes}).save_pretrained(tmp_path / "dep")
    images = data.images[:5]
    with torch.no_grad():
        expected = palette(images, stitch=sid)
    # a fresh interpreter that never imports esta
    code = f"""
import torch, json
from transformers import AutoModelForImageClassification, AutoImageProcessor
from PIL import Image
m = AutoModelForImageClassification.from_pretrained({str(tmp_path / 'dep')!r}).eval()
proc = AutoImageProcessor.from_pretrained({str(tmp_path / 'dep')!r})
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
pix = proc([Image.fromarray(i[0].numpy(), mode="L") for i in x], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = m(pixel_values=pix).logits
top = m.config.id2label[int(logits[0].argmax())]
print(json.dumps({{"logits": logits.tolist(), "labels": m.config.id2label, "top": top, "esta": "esta" in __import__("sys").modules}}))
"""
    torch.save(images, tmp_path / "x.pt")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["esta"]
    assert list(r["labels"].values()) == classes and r["top"] in classes
    torch.testing.assert_close(torch.tensor(r["logits"]), expected, atol=1e-4, rtol=1e-4)
    # and esta reads the same folder back as a deployed stitch
    again = DeployedStitch.from_pretrained(tmp_path / "dep")
    with torch.no_grad():
        torch.testing.assert_close(again(images), expected, atol=1e-5, rtol=1e-5)


def test_a_deployed_stitch_loads_through_the_auto_classes_and_pipeline(tmp_path, vit_family):
    from PIL import Image
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        pipeline,
    )

    import esta  # noqa: F401 - registers esta's model types with the Auto classes

    data = toy_task()
    palette, _ = build(vit_family[:2], data)
    perturb_adapters(palette)
    cut = max((s for s in palette.space.stitches if not s.is_anchor), key=lambda s: s.end_first)
    classes = ["dark", "mid", "bright"]
    DeployedStitch.from_palette(palette, cut.id, meta={"classes": classes}).save_pretrained(tmp_path / "dep")
    images = data.images[:5]
    with torch.no_grad():
        expected = palette(images, stitch=cut.id)

    assert AutoConfig.from_pretrained(tmp_path / "dep").model_type == "esta_image_stitch"
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "dep").eval()
    assert type(AutoModel.from_pretrained(tmp_path / "dep")) is type(model)
    assert list(model.config.id2label.values()) == classes  # the task's labels, not the source task's
    pil = [Image.fromarray(i[0].numpy(), mode="L") for i in images]
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "dep")(pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, labels=torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.loss is not None and out.loss.ndim == 0
    # the pipeline (which makes every image RGB) gives the same top class and probabilities
    answers = pipeline("image-classification", model=str(tmp_path / "dep"), top_k=3)(pil)
    probs = expected.softmax(-1)
    for answer, p in zip(answers, probs):
        assert answer[0]["label"] == classes[int(p.argmax())]
        assert abs(answer[0]["score"] - float(p.max())) < 1e-4
    # esta still reads the folder as its own
    again = DeployedStitch.from_pretrained(tmp_path / "dep")
    with torch.no_grad():
        torch.testing.assert_close(again(images), expected, atol=1e-5, rtol=1e-5)


def test_a_stitched_llm_generates_through_transformers_as_esta_does(tmp_path):
    from lm_fixtures import WORDS, save_tokenizer, trained_looking_lm_palette
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import esta  # noqa: F401
    from esta.generate import generate

    palette = trained_looking_lm_palette(tmp_path)
    cut = max((s for s in palette.space.stitches if not s.is_anchor), key=lambda s: s.end_first)
    assert cut.end_first > 0  # the end part starts mid-way: its own cache numbering
    deployed = DeployedStitch.from_palette(palette, cut.id)
    deployed.save_pretrained(tmp_path / "dep")
    save_tokenizer(tmp_path / "dep")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dep").eval()
    prompt = torch.randint(4, len(WORDS), (2, 5), generator=torch.Generator().manual_seed(4))
    ours = generate(deployed, prompt, 8)
    theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                            min_new_tokens=8, pad_token_id=0)
    assert torch.equal(theirs, ours)
    nocache = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False,
                             pad_token_id=0)
    assert torch.equal(nocache, ours)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, deployed({"input_ids": prompt}), atol=1e-5, rtol=1e-5)
    # sampling options, beams and several sequences run through the per-part cache
    sampled = model.generate(prompt, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=0.8,
                             num_return_sequences=2, pad_token_id=0)
    assert sampled.shape[0] == 4
    assert model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0).shape[0] == 2
    # the text-generation pipeline
    tok = AutoTokenizer.from_pretrained(tmp_path / "dep")
    text = pipeline("text-generation", model=str(tmp_path / "dep"))("w1 w2 w3", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].startswith("w1 w2 w3")
    assert len(tok(text[0]["generated_text"])["input_ids"]) > 3
    # PEFT's causal-LM task type takes it: LoRA on the stitch, a loss, gradients only in the adapters
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"]))
    loss = peft_model(input_ids=prompt, labels=prompt).loss
    loss.backward()
    grads = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


def test_a_deployed_llm_anchor_is_the_plain_transformers_model(tmp_path):
    from lm_fixtures import WORDS, save_tokenizer, trained_looking_lm_palette

    from esta.generate import generate

    palette = trained_looking_lm_palette(tmp_path, "qwen2")
    anchor = palette.space.anchor_ids()[-1]
    deployed = DeployedStitch.from_palette(palette, anchor)
    deployed.save_pretrained(tmp_path / "dep")
    save_tokenizer(tmp_path / "dep")
    prompt = torch.randint(4, len(WORDS), (2, 5), generator=torch.Generator().manual_seed(4))
    torch.save(prompt, tmp_path / "prompt.pt")
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dep')!r}).eval()
p = torch.load({str(tmp_path / 'prompt.pt')!r}, weights_only=True)
out = m.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                 pad_token_id=0)
print(json.dumps({{"ids": out.tolist(), "type": type(m).__name__, "esta": "esta" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["type"] == "Qwen2ForCausalLM" and not r["esta"]
    assert r["ids"] == generate(deployed, prompt, 6).tolist()
    again = DeployedStitch.from_pretrained(tmp_path / "dep")  # esta reads it back as its own
    with torch.no_grad():
        torch.testing.assert_close(again({"input_ids": prompt}), deployed({"input_ids": prompt}))


def test_a_folder_deployed_before_config_json_gets_one_with_one_command(tmp_path, vit_family):
    from helpers import esta as run_esta
    from transformers import AutoModelForImageClassification

    import esta  # noqa: F401

    data = toy_task()
    palette, _ = build(vit_family[:2], data)
    cut = next(s for s in palette.space.stitches if not s.is_anchor)
    DeployedStitch.from_palette(palette, cut.id).save_pretrained(tmp_path / "old")
    for name in ("config.json", "preprocessor_config.json"):  # as an older esta left it
        (tmp_path / "old" / name).unlink()
    r = run_esta("export", "--model", str(tmp_path / "old"), "--format", "transformers")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["written"] == ["config.json", "preprocessor_config.json"]
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "old").eval()
    images = data.images[:3]
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=images.float() / 255).logits, palette(images, stitch=cut.id),
                                   atol=1e-5, rtol=1e-5)


def test_a_model_card_says_how_to_load_what_it_describes():
    from esta.report import model_card

    run = {"task": "digits", "metric": "accuracy", "cost_axis": "flops", "method": "esta", "seed": 0, "steps": 20,
           "deploy_by": "validation"}
    point = {"name": "0[:5]->1[7:]", "cost": 7.1e7, "params": 9e5, "value": 0.652, "budget": 8e7}
    grey = {"family": "vision", "source": "ti", "config": {"num_hidden_layers": 3, "num_channels": 1}}
    cut = {"stitch": {"front": 0, "end": 1, "front_last": 1, "end_first": 2}, "front": grey,
           "end": {**grey, "source": "s"}}
    card = model_card(cut, point, run, "esta train --data digits")
    assert "import esta" in card and 'pipeline("image-classification"' in card and "GFLOPs per image" in card
    assert "65.2" in card and "esta train --data digits" in card
    # a grey anchor saved as plain DeiT: no esta needed, and no pipeline (it makes images RGB)
    anchor = {"stitch": {"front": 0, "end": 0, "front_last": 2, "end_first": 0}, "front": grey, "end": None,
              "weights": "transformers"}
    card = model_card(anchor, {**point, "name": "anchor0"}, run, None)
    assert "import esta" not in card and "pipeline(" not in card and "AutoImageProcessor" in card
    lm = {"stitch": cut["stitch"], "front": {"family": "causal-lm", "source": "a", "config": {"num_hidden_layers": 3}},
          "end": {"family": "causal-lm", "source": "b", "config": {"num_hidden_layers": 4}}}
    card = model_card(lm, {**point, "value": 12.3}, {**run, "metric": "perplexity", "cost_axis": "params"}, None)
    assert "AutoTokenizer.from_pretrained" in card and "per image" not in card and "per token" not in card

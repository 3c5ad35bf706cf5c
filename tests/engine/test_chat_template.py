"""Chat templates render exactly as transformers renders them, and fail as ChatTemplateError."""

from __future__ import annotations

import pytest

from engine.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    compile_chat_template,
    render_chat_template,
)
from engine.loader.gguf_vocab import build_tokenizer
from tests.engine.test_gguf_vocab import spm_metadata

# SmolLM2-135M-Instruct's template, as its GGUF and tokenizer_config.json carry it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 style: BOS written by the template, a system turn folded into the first user turn,
# strict alternation enforced with raise_exception.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% set content = message['content'] %}
        {% if loop.first and system is defined %}
            {% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}
        {% endif %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}
    {% else %}
        {{- ' ' + message['content'].strip() + ' ' + eos_token -}}
    {% endif %}
{% endfor %}"""

# Tools as JSON, loop controls, the generation tag, a namespace.
TOOLS = """{% set ns = namespace(n=0) %}
{% if tools %}Tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'stop' %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if message['role'] == 'assistant' %}
<{{ ns.n }}:assistant>{% generation %}{{ message['content'] }}{% endgeneration %}
    {% else %}
<{{ ns.n }}:{{ message['role'] }}>{{ message['content'] | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": 'Hi <there> & "you" — ça va? 🦙'},
    {"role": "assistant", "content": " Fine. "},
    {"role": "user", "content": "Bye"},
]
TOOL_LIST = [{"type": "function", "function": {"name": "f", "parameters": {"x": "<int>"}}}]


def test_smollm2_chatml_exact():
    messages = [{"role": "user", "content": "What is 2+2?"}]
    system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n"
    )
    turn = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert render_chat_template(CHATML, messages) == system + turn + "<|im_start|>assistant\n"
    assert render_chat_template(CHATML, messages, add_generation_prompt=False) == system + turn
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert render_chat_template(CHATML, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + turn
    )


def test_bos_and_eos_tokens_reach_the_template():
    text = ChatTemplate(LLAMA2).render(
        CONVERSATION, add_generation_prompt=False, bos_token="<s>", eos_token="</s>"
    )
    assert text == (
        '<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi <there> & "you" — ça va? 🦙 [/INST]'
        " Fine. </s><s>[INST] Bye [/INST]"
    )


def test_raise_exception_becomes_chat_template_error():
    wrong = [{"role": "assistant", "content": "I start"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate") as info:
        render_chat_template(LLAMA2, wrong, bos_token="<s>")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, ValueError)


def test_syntax_error_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        compile_chat_template("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat_template("{% if %}", [])


def test_render_errors_become_chat_template_error():
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ messages[0]['content'] + 1 }}", [{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        render_chat_template("{{ messages.append(1) }}", [])  # the environment is immutable
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ undefined_thing() }}", [])


def test_environment_details_match_transformers():
    assert render_chat_template("{{ tools | tojson }}", [], tools={"a": "<é>"}) == '{"a": "<é>"}'
    assert render_chat_template("{{ nothing }}|", []) == "|"  # undefined renders empty
    year = render_chat_template("{{ strftime_now('%Y') }}", [])
    assert year.isdigit() and len(year) == 4
    assert compile_chat_template(CHATML) is compile_chat_template(CHATML)


def transformers_render(template: str, messages: list, generation_prompt: bool, **kw) -> str:
    """transformers' own rendering, through a PreTrainedTokenizerFast built on our tokenizer."""
    transformers = pytest.importorskip("transformers")
    backend = build_tokenizer(spm_metadata())
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>"
    )
    return hf.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
        **kw,
    )


@pytest.mark.parametrize("template", [CHATML, LLAMA2, TOOLS], ids=["chatml", "llama2", "tools"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_matches_transformers(template, generation_prompt):
    messages = CONVERSATION[1:] if template is LLAMA2 else CONVERSATION
    if template is TOOLS:
        messages = [*messages, {"role": "stop", "content": ""}, {"role": "user", "content": "x"}]
    kwargs = {"tools": TOOL_LIST} if template is TOOLS else {}
    ours = render_chat_template(
        template,
        messages,
        add_generation_prompt=generation_prompt,
        bos_token="<s>",
        eos_token="</s>",
        **kwargs,
    )
    assert ours == transformers_render(template, messages, generation_prompt, **kwargs)
    if template is TOOLS:
        assert '"<int>"' in ours and "Bye" in ours and "<6:" not in ours  # tojson, break

"""A Llama-2-style SentencePiece tokenizer, trained by the tests themselves.

The text tests need a real SentencePiece BPE model with byte fallback (pieces for common text, byte
tokens `<0x00>`..`<0xFF>` for characters it has never seen) and Llama 2's special tokens and chat
template. No third-party model file is committed or read from outside the repository: `write_tokenizer`
trains one with sentencepiece's own trainer on text it generates from a fixed seed, then saves it
through transformers' `LlamaTokenizer`, so the folder holds what a published Llama 2 checkpoint holds
(`tokenizer.model`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`).

Ids are laid out as Llama 2's: 0 `<unk>`, 1 `<s>`, 2 `</s>`, then byte b as id b + 3, then pieces.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

VOCAB_SIZE = 2000
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_IDS = range(3, 259)

# Llama 2's chat template, as its tokenizer_config.json ships it.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\\n' + messages[0]['content'] | trim"
    " + '\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Words the tests encode (so each is a piece or two, as in a real vocabulary), common English, chat
# template markers and a few common CJK characters; rare characters stay out, so they fall back to bytes.
WORDS = """
Hello hello there world The the answer is Done done deal More more text follows one two three four
look here end Do Bye Stop stop partial a b c Say say Name name prime Another You are terse and to of
in that it for on with as was at by this be from or have an they which you were her all she there
would their we him been has when who will no if out so said what up its about into than them can only
other new some could time these may then do first any my now such like our over man me even most made
after also did many before must through back years where much your way well down should because each
just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off
come since against go came right used take three states himself few house use during without again
place American around however home small found Mrs thought went say part once general high upon
school every don't does got united left number course war until always away something fact though
water less public put think almost hand enough far took head yet government system better set told
nothing night end why called didn't eyes find going look asked later knew point next program city
business give group toward young let room president side social given present several order national
possible rather second face per among form important often things looked early white case John become
large big need four within felt along children saw best church ever least power development light
capital France Paris city country question answer model server request token tokens prompt reply
user assistant system message content role story tell Tell long short write hi Hi yes no ok okay count
number list JSON json please thanks weather today tomorrow name prime another question again hello world
Once once upon a time land far away lived fill And then word words
""".split()
# Chat template markup, so a turn's framing is a few pieces, as in Llama 2's vocabulary.
MARKUP = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "q0", "q1", "q2", "q3"]
CJK = list("你好世界中文的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生")
PUNCTUATION = [".", ",", "!", "?", ":", ";", "'", '"', "(", ")", "-", "[", "]", "<", ">", "/", "42", "7", "2024"]


def corpus(seed: int = 0, lines: int = 20000) -> str:
    """Sentences of the words above in random order, with punctuation, numbers and CJK runs."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), "".join(rng.choice(CJK) for _ in range(rng.randint(2, 6))))
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), rng.choice(PUNCTUATION))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(MARKUP))
        out.append(" ".join(words) + rng.choice([".", "!", "?", ","]))
    return "\n".join(out)


def train_model(seed: int = 0) -> bytes:
    """The SentencePiece model proto, trained as Llama 2's was (BPE, byte fallback, digits split)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed).splitlines()), model_writer=model, vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(directory: str | Path) -> Path:
    """Train the tokenizer and save it into `directory` (a checkpoint folder, or a new one)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(train_model())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
    }))
    # transformers converts the SentencePiece model into its fast tokenizer and writes tokenizer.json
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory

"""Tokenizers as `tokenizer.json`: byte-level BPE trained with HF `tokenizers`, or pure bytes.

Both kinds are one `tokenizers.Tokenizer` underneath, so both save as `tokenizer.json`, load in
`transformers.AutoTokenizer`, and encode identically after a round trip. The byte tokenizer maps byte
b to id b (0..255) and puts the special tokens after; BPE puts the special tokens first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from commonlm.errors import UserError
from commonlm.utils import atomic_write_json, atomic_write_text

EOT = "<|endoftext|>"  # ends every document in the token stream
PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # chat turns (ChatML)
SPECIAL_TOKENS = [EOT, PAD, IM_START, IM_END] + [f"<|reserved_{i}|>" for i in range(4)]
MAX_VOCAB = 1 << 24  # train_bpe's limit: far above any real vocabulary, far below what makes the trainer abort

# ChatML, as Qwen uses it: each turn is <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenization emits)."""
    return {b: ch for b, ch in zip(range(256), _byte_alphabet_in_byte_order())}


def _byte_alphabet_in_byte_order() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a model directory records.

    Our own tokenizers use <|endoftext|> (end of document), <|pad|> and ChatML. An imported one brings
    its own, read from its `tokenizer_config.json`.
    """

    def __init__(self, tk: HFTokenizer, eos_token: str = EOT, pad_token: str | None = PAD,
                 bos_token: str | None = None, chat_template: str | None = CHAT_TEMPLATE):
        self.tk = tk
        if tk.token_to_id(eos_token) is None:
            raise UserError(f"tokenizer: end-of-text token {eos_token!r} is not in the vocabulary; "
                            "train one with `commonlm tokenizer train`")
        self.eos_token, self.bos_token, self.chat_template = eos_token, bos_token, chat_template
        self.pad_token = pad_token if pad_token and tk.token_to_id(pad_token) is not None else None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        smallest = 256 + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise UserError(f"tokenizer: --vocab-size {vocab_size} is too small; use at least {smallest}")
        if vocab_size > MAX_VOCAB:  # 10^9 made the Rust trainer abort with a backtrace; real ones are < 300k
            raise UserError(f"tokenizer: --vocab-size {vocab_size} is too large; use at most {MAX_VOCAB:,} "
                            "(large models use 32,000-256,000)")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(SPECIAL_TOKENS)
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a directory holding `tokenizer.json` (and maybe `tokenizer_config.json`), or the file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"tokenizer: no tokenizer.json at {path} (train one with `commonlm tokenizer train`)")
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise UserError(f"tokenizer: {file} is not a valid tokenizer.json ({e})") from e
        config_file = file.parent / "tokenizer_config.json"
        if not config_file.is_file():
            return cls(tk)
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"tokenizer: {config_file} is not valid JSON ({e})") from e
        eos = _content(config.get("eos_token")) or EOT
        if eos != EOT and tk.token_to_id(EOT) is not None and tk.token_to_id(eos) is None:
            eos = EOT
        return cls(tk, eos_token=eos, pad_token=_content(config.get("pad_token")),
                   bos_token=_content(config.get("bos_token")), chat_template=_chat_template(config, file.parent))

    # -- use ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def kind(self) -> str:
        return "byte" if self.tk.get_vocab_size() <= 256 + len(SPECIAL_TOKENS) and self.token_id(EOT) == 256 else "bpe"

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    @property
    def eot_id(self) -> int:
        """Ends every document in the token stream: <|endoftext|> where the vocabulary has it, else eos."""
        eot = self.tk.token_to_id(EOT)
        return eot if eot is not None else self.tk.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.tk.token_to_id(self.pad_token) if self.pad_token else self.eot_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated answer: eos, end of document, end of a chat turn, and the start of a new
        turn (a model that opens one has finished its own; its text must never show the marker)."""
        ids = [self.tk.token_to_id(t) for t in (self.eos_token, EOT, IM_END, IM_START)]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text to ids. By default a literal '<|im_end|>' or '<|endoftext|>' in the text is plain text, as it
        must be for anything a user typed; allow_special=True reads such strings as the control tokens."""
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """Many texts at once, in parallel on all cores (the Rust side), which also lets other Python threads
        run meanwhile (plain `encode` holds the GIL: a server's event loop would stall). Plain text by default."""
        tk = self.tk if allow_special else self._plain_tk
        # the _fast variant skips computing character offsets (same ids, ~1.6x faster)
        return [e.ids for e in tk.encode_batch_fast(texts, add_special_tokens=False)]

    @functools.cached_property
    def _plain_tk(self) -> HFTokenizer:
        """A copy that reads special-token strings as text. A copy rather than toggling the flag on `tk`:
        the server tokenizes on several threads, and a toggle could let one thread's user text through as
        control tokens while another thread encodes with them allowed."""
        tk = HFTokenizer.from_str(self.tk.to_str())
        tk.encode_special_tokens = True
        return tk

    @functools.cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """The control tokens (added tokens marked special), longest first."""
        found = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}
        return tuple(sorted(found, key=len, reverse=True))

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token of plain text stands for (control tokens aside: plain text never
        contains them). A text of n bytes has at least about n / this many tokens (see `min_tokens`)."""
        special = set(self.special_tokens)
        return max(len(t.encode("utf-8", "replace")) for t in self.tk.get_vocab(with_added_tokens=True)
                   if t not in special)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text` as plain text, without tokenizing it: lets a server refuse a
        megabyte prompt at once. Halved for normalizers that shorten text (NFC, NFKC) before the vocabulary
        sees it."""
        return len(text.encode("utf-8", "replace")) // (2 * self.max_token_bytes)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def to_json(self) -> str:
        return self.tk.to_str()

    @property
    def hash(self) -> str:
        """Identifies the vocabulary; data shards record it so a mismatched tokenizer is caught."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that `AutoTokenizer` understands."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self.to_json())
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.tk.get_added_tokens_decoder().items())
        }
        chat = [t for t in (IM_START, IM_END) if self.token_id(t) is not None]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "additional_special_tokens": chat,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
            "model_max_length": model_max_length or 1_000_000_000,
        }
        atomic_write_json(directory / "tokenizer_config.json", config)
        special_map = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                       "additional_special_tokens": chat}
        atomic_write_json(directory / "special_tokens_map.json", {k: v for k, v in special_map.items() if v})

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the chat template (Jinja, in a sandbox: templates come with downloaded models). The text is
        what transformers' `apply_chat_template` gives; to tokenize a conversation use `encode_chat`."""
        if not self.chat_template:
            raise UserError("tokenizer: this tokenizer has no chat template")
        return _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token,
        )

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """A conversation rendered with the chat template and tokenized so that message text is always plain
        text: a user who types '<|im_end|>\\n<|im_start|>system' gets those characters, not a forged turn.
        Control tokens come only from the template itself.

        How: the template is rendered a second time with each message's content between two random markers;
        control tokens outside the marked spans are the template's. The text is cut only at those, and each
        piece between them is tokenized as plain text -- which is how `tokenizers` itself splits text at
        special tokens, so ordinary conversations get exactly the ids of `apply_chat_template` + encode.
        """
        text = self.apply_chat_template(messages, add_generation_prompt)
        contents = [m.get("content") for m in messages]
        forged = any(isinstance(c, str) and t in c for c in contents for t in self.special_tokens)
        if not forged:
            return self.encode(text, allow_special=True)
        tag = secrets.token_hex(8)
        open_, close = f"\ue000{tag}\ue001", f"\ue001{tag}\ue000"
        marked = self.apply_chat_template(
            [{**m, "content": f"{open_}{m['content']}{close}"} if isinstance(m.get("content"), str) else m
             for m in messages], add_generation_prompt)
        if marked.replace(open_, "").replace(close, "") != text:  # the template rewrites message text
            bad = next(t for c in contents for t in self.special_tokens if isinstance(c, str) and t in c)
            raise UserError(f"a message contains the control token {bad!r}, and this chat template changes "
                            "message text, so it cannot be kept as plain text; remove it from the message")
        # the template's own control tokens: those in the text outside the marked spans
        trusted, plain, depth = [], [], 0
        for part in re.split(f"({re.escape(open_)}|{re.escape(close)})", marked):
            if part in (open_, close):
                depth += 1 if part == open_ else -1
                continue
            if depth > 0:
                plain.append(part)
                continue
            for piece in re.split(f"({'|'.join(map(re.escape, self.special_tokens))})", part):
                if piece in self.special_tokens:
                    trusted.append("".join(plain))
                    trusted.append(piece)
                    plain = []
                else:
                    plain.append(piece)
        trusted.append("".join(plain))
        texts, specials = trusted[0::2], trusted[1::2]
        encoded = self.encode_batch(texts)
        ids = list(encoded[0])
        for special, piece in zip(specials, encoded[1:]):
            ids.append(self.tk.token_to_id(special))
            ids.extend(piece)
        return ids


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str):
    """A chat template compiled once (1 ms a time; rendering a compiled one takes 10 us: preparing chat data
    renders every conversation several times)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _chat_template(config: dict, directory: Path) -> str | None:
    """The chat template in tokenizer_config.json, else in chat_template.jinja beside it (where current
    transformers saves it). Of a list of named templates, the one named 'default'."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja = directory / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template or None


def _content(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    return token.get("content") if isinstance(token, dict) else token


def describe(tok: Tokenizer) -> str:
    return json.dumps({"kind": tok.kind, "vocab_size": tok.vocab_size, "hash": tok.hash})

"""
The ChatML chat template, in one place: its two control tokens and `ChatML`, the mixin both
tokenizers (tokenizer.Tokenizer, chars.CharTokenizer) inherit for `chat_prompt` (text) and
`encode_chat` (ids).

Control tokens come from the template only. `encode(text)` reads text as plain text: a user who
types "<|im_end|>\n<|im_start|>assistant" gets those characters, never the control tokens, so no one
can forge a turn. (Hugging Face's apply_chat_template renders the template to a string and tokenizes
it with specials recognised: there that user text becomes control tokens. tests/test_tokenizer.py
shows both.)
"""

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


class ChatML:
    """The chat template, for a tokenizer whose specials hold ChatML's two control tokens (both
    tokenizers inherit it; it reads their `special`, `system_prompt`, `name` and `encode`)."""

    @property
    def has_chat(self):
        return CHATML_START in self.special and CHATML_END in self.special

    def chat_parts(self, messages, system=None):
        """ChatML up to the assistant's turn as (text, is_control) parts. messages: a user message
        string, or [{"role", "content"}]. Without a system message, `system` or the model's default
        system prompt leads."""
        if not self.has_chat:
            raise ValueError(f"{self.name}: no {CHATML_START} / {CHATML_END} tokens; "
                             f"not a ChatML chat model")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if messages and messages[0]["role"] == "system":
            if system is not None:
                raise ValueError("system given twice: as an argument and as the first message")
        else:
            system = system if system is not None else self.system_prompt
            messages = messages if system is None else [{"role": "system", "content": system},
                                                        *messages]
        parts = []
        for m in messages:
            parts += [(CHATML_START, True), (f"{m['role']}\n{m['content']}", False),
                      (CHATML_END, True), ("\n", False)]
        return parts + [(CHATML_START, True), ("assistant\n", False)]

    def chat_prompt(self, messages, system=None):
        """The template's text up to the assistant's turn; for showing and storing."""
        return "".join(text for text, _ in self.chat_parts(messages, system))

    def encode_chat(self, messages, system=None):
        """The template's ids: control tokens where the template puts them, every message as plain
        text. For ordinary messages the same ids as encode(chat_prompt(...), specials=True), and as
        Hugging Face's."""
        ids = []
        for text, control in self.chat_parts(messages, system):
            ids += [self.special[text]] if control else self.encode(text)
        return ids

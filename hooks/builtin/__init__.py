"""Built-in hooks, usable by short name in adapters.yaml (`module: regex_redact`).

Each is a small, complete example of the contract in `hooks.base`; the names here win over an
installed package's entry point of the same name.
"""

from __future__ import annotations

#: short name → `package.module:Class`
BUILTIN_HOOKS = {
    "max_prompt_tokens": "hooks.builtin.policy:MaxPromptTokensHook",
    "system_prompt": "hooks.builtin.policy:SystemPromptHook",
    "regex_redact": "hooks.builtin.redaction:RegexRedactHook",
    "jsonl_log": "hooks.builtin.jsonl_log:JsonlLogHook",
    "header_tags": "hooks.builtin.tags:HeaderTagsHook",
}

__all__ = ["BUILTIN_HOOKS"]

"""The chat format of the tiny base and of any base that lacks one.

Zephyr/TinyLlama-chat style turns. The assistant's reply and its closing `</s>` sit inside
`{% generation %}` markers, which is what TRL's `assistant_only_loss` needs to train on replies only.
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

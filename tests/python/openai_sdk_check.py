"""Drives Taproom with the real OpenAI Python SDK. Prints one line per check; exits non-zero on
the first failure. Env: TAPROOM_BASE (http://127.0.0.1:PORT/v1), TAPROOM_KEY (a JWT),
TAPROOM_MODEL (char-<slug>), TAPROOM_DOWN_BASE / TAPROOM_DOWN_MODEL (a server and character
whose upstream is failing)."""
import os
import sys

import openai

base = os.environ["TAPROOM_BASE"]
key = os.environ["TAPROOM_KEY"]
model = os.environ["TAPROOM_MODEL"]
down = os.environ["TAPROOM_DOWN_MODEL"]
down_client = openai.OpenAI(base_url=os.environ["TAPROOM_DOWN_BASE"], api_key=key, max_retries=0, timeout=20)
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}")
        sys.exit(1)
    print(f"ok {name}")


ids = [m.id for m in client.models.list()]
check("models.list includes the character", model in ids, ids)

r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello sdk"}])
check("non-streaming content", r.choices[0].message.content == "echo: hello sdk", r)
check("non-streaming finish_reason", r.choices[0].finish_reason == "stop", r)
check("usage", r.usage is not None and r.usage.total_tokens > 0, r.usage)

parts = []
finish = None
for chunk in client.chat.completions.create(model=model, stream=True, messages=[{"role": "user", "content": "stream sdk"}]):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
check("streaming content", "".join(parts) == "echo: stream sdk", parts)
check("streaming finish_reason", finish == "stop", finish)

bad = openai.OpenAI(base_url=base, api_key="not-a-token", max_retries=0)
try:
    bad.models.list()
    check("401 raises", False)
except openai.AuthenticationError as e:
    check("401 is AuthenticationError", e.status_code == 401)

try:
    client.chat.completions.create(model="char-nobody-here", messages=[{"role": "user", "content": "x"}])
    check("404 raises", False)
except openai.NotFoundError as e:
    check("404 is NotFoundError", e.status_code == 404)

status = None
for _ in range(5):
    try:
        down_client.chat.completions.create(model=down, messages=[{"role": "user", "content": "x"}])
    except openai.APIStatusError as e:
        status = e.status_code
        if e.response.headers.get("x-should-retry") == "false":
            break
check("503 while the breaker is open", status == 503, status)
try:
    down_client.chat.completions.create(model=down, messages=[{"role": "user", "content": "x"}])
    check("503 raises", False)
except openai.InternalServerError as e:
    check("503 is InternalServerError", e.status_code == 503)
print("all checks passed")

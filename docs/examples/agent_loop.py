"""An agent loop against mlx-serving with the official openai client (docs/api.md shows its output).

    mlx-serving up
    python docs/examples/agent_loop.py
"""

import json

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}]
messages = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]

# 1. The model must call a tool; streamed, and assembled by the client's own helpers.
with client.chat.completions.stream(model="demo", messages=messages, tools=tools, tool_choice="required",
                                    parallel_tool_calls=False, temperature=0.7, seed=1, max_tokens=100) as stream:
    for event in stream:
        if event.type == "tool_calls.function.arguments.delta":
            print("arguments delta:", repr(event.arguments_delta))
    completion = stream.get_final_completion()
call = completion.choices[0].message.tool_calls[0]
print("finish_reason:", completion.choices[0].finish_reason)
print("call:", call.id, call.function.name, call.function.arguments)

# 2. Run the tool, send its result back.
args = json.loads(call.function.arguments)
result = {"city": args["city"], "forecast": ["sunny"] * args["days"]}
messages += [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
]

# 3. The model answers (the demo model has random weights: its answer is gibberish).
answer = client.chat.completions.create(model="demo", messages=messages, tools=tools, max_tokens=24, seed=1)
print("answer:", repr(answer.choices[0].message.content), answer.choices[0].finish_reason)

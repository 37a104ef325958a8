"""Regenerate the bundled `data=tools` sample (trainer/samples/tools/*.jsonl), deterministically.

    .venv/bin/python scripts/make_tools_sample.py          # rewrites train.jsonl and validation.jsonl

A travel assistant with three functions (weather, currency conversion, local time). The examples
mix single calls, parallel calls, answers written from a tool's result, and plain chat where the
right answer is no call (some of them near misses: a city or a currency named, nothing to look up).
About one call example in eight uses the legacy format (`functions` + `function_call` + a
`function` result message), so the sample exercises both. Validation cities, amounts and several
phrasings never occur in training: the eval measures calls on prompts the model never saw.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "trainer" / "samples" / "tools"
SYSTEM = "You are a helpful travel assistant."

FUNCTIONS = [
    {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
         "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount between currencies (ISO codes).",
     "parameters": {"type": "object", "properties": {
         "amount": {"type": "number"},
         "from_currency": {"type": "string"},
         "to_currency": {"type": "string"}},
         "required": ["amount", "from_currency", "to_currency"]}},
    {"name": "get_local_time", "description": "Current local time in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
]
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]

TRAIN_CITIES = ["Porto", "Lisbon", "Madrid", "Paris", "Berlin", "Rome", "Vienna", "Prague", "Oslo", "Dublin",
                "Tokyo", "Seoul", "Sydney", "Toronto", "Chicago", "Boston", "Cairo", "Nairobi", "Lima", "Denver"]
VALID_CITIES = ["Seville", "Munich", "Krakow", "Helsinki", "Osaka", "Melbourne", "Montreal", "Austin", "Marrakesh",
                "Bogota", "Zurich", "Athens"]
CURRENCIES = {"USD": ["dollars", "US dollars", "USD"], "EUR": ["euros", "EUR"], "GBP": ["pounds", "British pounds", "GBP"],
              "JPY": ["yen", "Japanese yen", "JPY"], "CHF": ["Swiss francs", "CHF"], "CAD": ["Canadian dollars", "CAD"]}

WEATHER = ["What's the weather like in {city}?", "How is the weather in {city} right now?", "Is it raining in {city}?",
           "Weather in {city}, please.", "Do I need a jacket in {city} today?", "How warm is it in {city}?"]
WEATHER_F = ["What's the temperature in {city} in Fahrenheit?", "Weather in {city} in fahrenheit, please."]
MONEY = ["How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.", "What are {amount} {src} worth in {dst}?",
         "I have {amount} {src}. How many {dst} is that?"]
TIME = ["What time is it in {city}?", "What's the local time in {city}?", "Tell me the current time in {city}.",
        "Is it late in {city} right now?"]
BOTH = ["What's the weather in {city} and in {city2}?", "Compare the weather in {city} and {city2}."]
WEATHER_TIME = ["What's the weather and the local time in {city}?"]
# Held-out phrasings: validation only.
VALID_PHRASES = {"weather": ["Any sun in {city} today?", "Tell me the forecast for {city} now."],
                 "money": ["Exchange {amount} {src} into {dst}, please."],
                 "time": ["What's the clock showing in {city}?"]}

PLAIN = [  # (question, answer): no function helps
    ("Thanks, that's all!", "You're welcome, enjoy your trip!"),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("How do I say thank you in Portuguese?", "You say \"obrigado\" (or \"obrigada\" if you are a woman)."),
    ("Can you recommend a dish to try in Rome?", "Try cacio e pepe, a classic Roman pasta with cheese and pepper."),
    ("What's a good time of year to visit Lisbon?", "Spring and early autumn: mild, sunny and less crowded."),
    ("Is the euro used in Portugal?", "Yes, Portugal uses the euro."),
    ("Which currency do they use in Japan?", "Japan uses the yen (JPY)."),
    ("Do I need a visa for a short trip to Canada?", "It depends on your passport; check Canada's official visa page before you book."),
    ("Hello!", "Hi! Where are you travelling to?"),
    ("Tell me a fun fact about Paris.", "The Eiffel Tower grows about 15 cm taller in summer as the metal expands."),
    ("What should I pack for a beach holiday?", "Sunscreen, a hat, swimwear, sandals and a light layer for the evening."),
    ("How many time zones does Russia have?", "Russia has 11 time zones."),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil."),
    ("Is tipping expected in Tokyo?", "No, tipping is not customary in Japan."),
    ("Write a one-line travel motto.", "Pack light, wander far, stay curious."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red, so the sky looks blue."),
    ("What's the tallest mountain in the world?", "Mount Everest, at 8,849 metres."),
    ("Should I exchange money before I travel?", "Bring a little cash for arrival; cards and local ATMs usually give better rates."),
]
VALID_PLAIN = [
    ("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ("How do I say hello in Spanish?", "You say \"hola\"."),
    ("Which currency does Switzerland use?", "Switzerland uses the Swiss franc (CHF)."),
    ("When is the best season to visit Athens?", "Spring and autumn: warm, sunny and less crowded."),
    ("Thank you so much!", "You're welcome, have a great trip!"),
    ("What is a good souvenir from Munich?", "A beer stein or some Bavarian gingerbread."),
]


def call(rng, name: str, arguments: dict) -> dict:
    return {"id": f"call_{rng.getrandbits(48):012x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def example(rng, user: str, calls: list[tuple[str, dict]], legacy: bool = False, results: list[str] = (),
            answer: str = "") -> dict:
    """One example: system, user, the assistant's calls; with `results`, the tool results and a final answer."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if legacy:
        name, arguments = calls[0]
        messages.append({"role": "assistant", "content": None,
                         "function_call": {"name": name, "arguments": json.dumps(arguments)}})
        messages += [{"role": "function", "name": name, "content": r} for r in results]
    else:
        made = [call(rng, name, arguments) for name, arguments in calls]
        messages.append({"role": "assistant", "content": None, "tool_calls": made})
        messages += [{"role": "tool", "tool_call_id": c["id"], "content": r} for c, r in zip(made, results)]
    if results:
        messages.append({"role": "assistant", "content": answer})
    return ({"functions": FUNCTIONS} if legacy else {"tools": TOOLS}) | {"messages": messages}


def plain(question: str, answer: str, legacy: bool) -> dict:
    return ({"functions": FUNCTIONS} if legacy else {"tools": TOOLS}) | {"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
        {"role": "assistant", "content": answer}]}


def weather_result(rng, city: str, unit: str = "celsius") -> tuple[str, str]:
    conditions = rng.choice(["sunny", "cloudy", "light rain", "clear", "windy"])
    degrees = rng.randint(4, 30)
    if unit == "fahrenheit":
        degrees = round(degrees * 9 / 5 + 32)
    symbol = "°F" if unit == "fahrenheit" else "°C"
    return (json.dumps({"city": city, "temperature": degrees, "unit": unit, "conditions": conditions}),
            f"It's {degrees} {symbol} and {conditions} in {city} right now.")


def build(rng, cities: list[str], counts: dict, phrases: dict, plain_pairs: list) -> list[dict]:
    rows = []
    pick = lambda options: rng.choice(options)  # noqa: E731
    legacy_turn = iter(i % 8 == 3 for i in range(10_000))  # every eighth call example: the legacy format

    for _ in range(counts["weather"]):
        city = pick(cities)
        rows.append(example(rng, pick(phrases["weather"]).format(city=city), [("get_weather", {"city": city})],
                            legacy=next(legacy_turn)))
    for _ in range(counts["weather_f"]):
        city = pick(cities)
        rows.append(example(rng, pick(WEATHER_F).format(city=city),
                            [("get_weather", {"city": city, "unit": "fahrenheit"})], legacy=next(legacy_turn)))
    for _ in range(counts["money"]):
        src, dst = rng.sample(sorted(CURRENCIES), 2)
        amount = rng.choice([20, 50, 75, 100, 120, 250, 300, 500, 1000, 1500, 40, 60])
        user = pick(phrases["money"]).format(amount=amount, src=pick(CURRENCIES[src]), dst=pick(CURRENCIES[dst]))
        rows.append(example(rng, user, [("convert_currency", {"amount": amount, "from_currency": src, "to_currency": dst})],
                            legacy=next(legacy_turn)))
    for _ in range(counts["time"]):
        city = pick(cities)
        rows.append(example(rng, pick(phrases["time"]).format(city=city), [("get_local_time", {"city": city})],
                            legacy=next(legacy_turn)))
    for _ in range(counts["parallel"]):
        city, city2 = rng.sample(cities, 2)
        if rng.random() < 0.6:
            rows.append(example(rng, pick(BOTH).format(city=city, city2=city2),
                                [("get_weather", {"city": city}), ("get_weather", {"city": city2})]))
        else:
            rows.append(example(rng, pick(WEATHER_TIME).format(city=city),
                                [("get_weather", {"city": city}), ("get_local_time", {"city": city})]))
    for _ in range(counts["answers"]):  # the call, its result, and the answer written from it
        city = pick(cities)
        kind = rng.choice(["weather", "time", "money"])
        legacy = next(legacy_turn)
        if kind == "weather":
            result, answer = weather_result(rng, city)
            rows.append(example(rng, pick(phrases["weather"]).format(city=city), [("get_weather", {"city": city})],
                                legacy, [result], answer))
        elif kind == "time":
            clock = f"{rng.randint(0, 23):02d}:{rng.choice(['05', '15', '30', '45', '50'])}"
            rows.append(example(rng, pick(phrases["time"]).format(city=city), [("get_local_time", {"city": city})],
                                legacy, [json.dumps({"city": city, "local_time": clock})], f"It's {clock} in {city}."))
        else:
            src, dst = rng.sample(sorted(CURRENCIES), 2)
            amount = rng.choice([20, 50, 100, 200, 400])
            rate = round(rng.uniform(0.5, 1.6), 4)
            converted = round(amount * rate, 2)
            user = pick(phrases["money"]).format(amount=amount, src=pick(CURRENCIES[src]), dst=pick(CURRENCIES[dst]))
            rows.append(example(rng, user, [("convert_currency", {"amount": amount, "from_currency": src, "to_currency": dst})],
                                legacy, [json.dumps({"amount": converted, "currency": dst, "rate": rate})],
                                f"{amount} {src} is about {converted:.2f} {dst}."))
    for index, (question, answer) in enumerate(plain_pairs):
        rows.append(plain(question, answer, legacy=index % 8 == 5))
    rng.shuffle(rows)
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train_phrases = {"weather": WEATHER, "money": MONEY, "time": TIME}
    valid_phrases = {k: v + VALID_PHRASES[k] for k, v in train_phrases.items()}
    train = build(random.Random(13), TRAIN_CITIES,
                  dict(weather=20, weather_f=5, money=18, time=12, parallel=6, answers=12), train_phrases, PLAIN)
    valid = build(random.Random(14), VALID_CITIES,
                  dict(weather=5, weather_f=1, money=4, time=3, parallel=2, answers=3), valid_phrases, VALID_PLAIN)
    for name, rows in (("train.jsonl", train), ("validation.jsonl", valid)):
        (OUT / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote {OUT / name}: {len(rows)} examples")


if __name__ == "__main__":
    main()

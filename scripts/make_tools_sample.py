"""Regenerate the bundled `data=tools` sample (trainer/samples/tools/*.jsonl), deterministically.

    .venv/bin/python scripts/make_tools_sample.py          # rewrites train.jsonl and validation.jsonl

A travel assistant with three functions (weather, currency conversion, local time). Every example
declares the functions; the mix teaches when to call and when not to:

- ~40% calls: single calls to each function in varied phrasings, and parallel calls (two cities, or
  weather and time in one city);
- ~30% plain chat where the right answer is no call: greetings, thanks (some right after an
  answered call), general questions, questions about a city (food, sights, souvenirs), and questions
  about weather, money or time zones that need no look-up (nothing current to fetch);
- ~30% answers from a result: the call, the tool's result, and the answer written in words from it.

The mix was tuned on the eval: with 7 parallel calls in 168 examples and no city questions without a
look-up, the fine-tuned model made only the first of two parallel calls and invented functions for
questions about a city (README, Function calling and tools).

About one example in eight uses the legacy format (`functions` + `function_call` + a `function`
result message), so the sample exercises both. Validation cities, amounts, plain questions and
several phrasings never occur in training: the eval measures behaviour on prompts the model never saw.
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
                "Tokyo", "Seoul", "Sydney", "Toronto", "Chicago", "Boston", "Cairo", "Nairobi", "Lima", "Denver",
                "Barcelona", "Amsterdam", "Stockholm", "Warsaw", "Istanbul", "Dubai", "Singapore", "Bangkok",
                "Vancouver", "Miami", "Mexico City", "Cape Town"]
VALID_CITIES = ["Seville", "Munich", "Krakow", "Helsinki", "Osaka", "Melbourne", "Montreal", "Austin", "Marrakesh",
                "Bogota", "Zurich", "Athens", "Edinburgh", "Hanoi"]
TRAIN_AMOUNTS = [20, 40, 50, 60, 75, 80, 100, 120, 200, 250, 300, 400, 500, 1000, 1500]
VALID_AMOUNTS = [35, 45, 90, 150, 600, 2500]
CURRENCIES = {"USD": ["dollars", "US dollars", "USD"], "EUR": ["euros", "EUR"], "GBP": ["pounds", "British pounds", "GBP"],
              "JPY": ["yen", "Japanese yen", "JPY"], "CHF": ["Swiss francs", "CHF"], "CAD": ["Canadian dollars", "CAD"]}

PHRASES = {  # training phrasings
    "weather": ["What's the weather like in {city}?", "How is the weather in {city} right now?",
                "Is it raining in {city}?", "Weather in {city}, please.", "Do I need a jacket in {city} today?",
                "How warm is it in {city}?", "Can you check the weather in {city}?", "Is it sunny in {city}?",
                "I'm heading to {city}. What's the weather doing there?", "how's the weather in {city}"],
    "weather_f": ["What's the temperature in {city} in Fahrenheit?", "Weather in {city} in fahrenheit, please.",
                  "How hot is it in {city}, in °F?"],
    "money": ["How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.",
              "What are {amount} {src} worth in {dst}?", "I have {amount} {src}. How many {dst} is that?",
              "{amount} {src} to {dst}?", "If I change {amount} {src}, how many {dst} do I get?"],
    "time": ["What time is it in {city}?", "What's the local time in {city}?", "Tell me the current time in {city}.",
             "Is it late in {city} right now?", "What hour is it in {city}?", "Can you check the clock in {city}?",
             "Is it morning or night in {city} right now?", "I want to call a friend in {city}. What time is it there?",
             "Current time in {city}, please.", "Is it too early to phone someone in {city}?", "time in {city}?"],
    "two_weather": ["What's the weather in {city} and in {city2}?", "Compare the weather in {city} and {city2}.",
                    "Is it warmer in {city} or {city2}?", "Weather for {city} and {city2}, please.",
                    "I'm choosing between {city} and {city2}. How's the weather in each?"],
    "two_time": ["What time is it in {city} and in {city2}?", "Local time in {city} and {city2}?"],
    "weather_time": ["What's the weather and the local time in {city}?", "Time and weather in {city}, please."],
}
VALID_PHRASES = {  # held-out phrasings, validation only
    "weather": ["Any sun in {city} today?", "Tell me the forecast for {city} now.", "Is it cold in {city} at the moment?",
                "What are conditions like in {city}?"],
    "weather_f": ["Give me the temperature in {city} in Fahrenheit."],
    "money": ["Exchange {amount} {src} into {dst}, please.", "How many {dst} would I get for {amount} {src}?"],
    "time": ["What's the clock showing in {city}?", "Do you know what time it is over in {city}?",
             "Has the day started in {city} yet? What time is it there?"],
    "two_weather": ["How does the weather in {city} compare with {city2}?",
                    "Tell me the current weather in both {city} and {city2}."],
    "two_time": ["What's the time in {city} and {city2} right now?"],
    "weather_time": ["In {city}, what's the weather and what time is it?"],
}

PLAIN = [  # (question, answer): no function helps
    ("Hello!", "Hi! Where are you travelling to?"),
    ("Hi there, how are you?", "I'm doing well, thanks! How can I help with your trip?"),
    ("Good morning!", "Good morning! Planning a trip today?"),
    ("Thanks, that's all!", "You're welcome, enjoy your trip!"),
    ("Thank you, that helps a lot.", "Glad it helped! Safe travels."),
    ("Great, thanks!", "You're welcome!"),
    ("Cheers!", "Cheers! Have a lovely trip."),
    ("Bye for now.", "Goodbye, and happy travels!"),
    ("Who are you?", "I'm a travel assistant: I can check weather, convert currencies and tell the local time."),
    ("What can you do?", "I can look up the weather, convert money between currencies and tell you the time in a city."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red, so the sky looks blue."),
    ("What's the tallest mountain in the world?", "Mount Everest, at 8,849 metres."),
    ("Write a one-line travel motto.", "Pack light, wander far, stay curious."),
    ("What's 15 times 4?", "15 times 4 is 60."),
    ("Tell me a joke.", "Why don't maps ever get lost? They always know where they stand."),
    ("How many continents are there?", "Seven: Africa, Antarctica, Asia, Australia, Europe, North and South America."),
    ("What is the largest ocean?", "The Pacific Ocean."),
    ("How do I say thank you in Portuguese?", "You say \"obrigado\" (or \"obrigada\" if you are a woman)."),
    ("Can you recommend a dish to try in Rome?", "Try cacio e pepe, a classic Roman pasta with cheese and pepper."),
    ("What's a good time of year to visit Lisbon?", "Spring and early autumn: mild, sunny and less crowded."),
    ("Is the euro used in Portugal?", "Yes, Portugal uses the euro."),
    ("Which currency do they use in Japan?", "Japan uses the yen (JPY)."),
    ("Do I need a visa for a short trip to Canada?", "It depends on your passport; check Canada's official visa page before you book."),
    ("Tell me a fun fact about Paris.", "The Eiffel Tower grows about 15 cm taller in summer as the metal expands."),
    ("What should I pack for a beach holiday?", "Sunscreen, a hat, swimwear, sandals and a light layer for the evening."),
    ("How many time zones does Russia have?", "Russia has 11 time zones."),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil."),
    ("Is tipping expected in Tokyo?", "No, tipping is not customary in Japan."),
    ("Should I exchange money before I travel?", "Bring a little cash for arrival; cards and local ATMs usually give better rates."),
    ("How do I convert Celsius to Fahrenheit?", "Multiply by 9/5 and add 32: 20 °C is 68 °F."),
    ("What does GMT stand for?", "Greenwich Mean Time, the time at the Greenwich meridian in London."),
    ("What time zone is Tokyo in?", "Japan Standard Time, UTC+9, with no daylight saving."),
    ("Is Berlin usually cold in winter?", "Yes, Berlin winters are cold, often around 0 °C."),
    ("What is the currency code for the British pound?", "GBP."),
    ("What's the symbol for the euro?", "€."),
    ("Does Chicago get a lot of snow?", "Yes, Chicago winters are usually snowy and windy."),
    ("What is daylight saving time?", "Clocks move forward an hour in summer so evenings stay light longer."),
    ("Is Sydney in the southern hemisphere?", "Yes, so its summer runs from December to February."),
    ("Do I need a plug adapter in the UK?", "Yes, the UK uses type G plugs, so most visitors need an adapter."),
    ("How long is the flight from Paris to Rome?", "About two hours."),
    ("What does a 60% chance of rain mean?", "On six days out of ten with that forecast it rains, so pack an umbrella."),
    ("Is it better to pay in local currency or my own when abroad?", "Usually in local currency: the card terminal's conversion rate tends to be worse."),
    ("What's the rainy season in Bangkok?", "Roughly May to October."),
    # about a city, but nothing current to look up: the city alone is no reason to call
    ("What is a good souvenir from Lisbon?", "A tin of sardines or a hand-painted azulejo tile."),
    ("What should I eat in Tokyo?", "Sushi at a market counter, ramen and a bowl of tempura soba."),
    ("Which sights should I not miss in Prague?", "Charles Bridge, Prague Castle and the Old Town astronomical clock."),
    ("What language do they speak in Vienna?", "German, with a soft Austrian accent."),
    ("How do I get from the airport to the centre of Amsterdam?", "The train from Schiphol reaches Centraal in about 15 minutes."),
    ("Is Oslo expensive?", "Yes, Oslo is one of Europe's priciest cities; budget more for food and drinks."),
    ("What is Nairobi famous for?", "Nairobi National Park, with giraffes and rhinos right next to the city."),
    ("How old is the city of Rome?", "Tradition dates Rome's founding to 753 BC."),
    ("Which neighbourhood should I stay in, in Barcelona?", "The Eixample is central and calm; the Gothic Quarter is livelier."),
    ("What's a typical breakfast in Istanbul?", "Cheese, olives, tomatoes, eggs, simit bread and plenty of tea."),
    ("How do I say good morning in German?", "\"Guten Morgen\"."),
    ("How do you say thank you in Japanese?", "\"Arigatou gozaimasu\"."),
    ("What river runs through Cairo?", "The Nile."),
    ("Is Singapore a city or a country?", "Both: Singapore is a city-state."),
    ("What's the population of Toronto?", "About three million people in the city itself."),
    ("What's the freezing point of water in Fahrenheit?", "32 °F."),
    ("What is the hottest month in Dubai?", "August, often above 40 °C."),
    ("How many hours ahead of London is Tokyo?", "Nine hours, or eight during British summer time."),
    ("What currency do they use in Mexico?", "The Mexican peso (MXN)."),
    ("What does the abbreviation CET mean?", "Central European Time, UTC+1."),
    ("Is it safe to drink tap water in Stockholm?", "Yes, Stockholm's tap water is excellent."),
    ("Recommend a day trip from Madrid.", "Toledo: a medieval hilltop city half an hour away by fast train."),
    ("What is Chicago's nickname?", "The Windy City."),
    ("When is cherry blossom season in Seoul?", "Early April."),
    ("Do shops close on Sundays in Berlin?", "Yes, most shops are closed on Sundays."),
]
VALID_PLAIN = [
    ("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ("How do I say hello in Spanish?", "You say \"hola\"."),
    ("Which currency does Switzerland use?", "Switzerland uses the Swiss franc (CHF)."),
    ("When is the best season to visit Athens?", "Spring and autumn: warm, sunny and less crowded."),
    ("Thank you so much!", "You're welcome, have a great trip!"),
    ("What is a good souvenir from Munich?", "A beer stein or some Bavarian gingerbread."),
    ("Good evening!", "Good evening! Where are you off to?"),
    ("What's the boiling point of water in Fahrenheit?", "212 °F at sea level."),
    ("What time zone is Helsinki in?", "Eastern European Time, UTC+2 (UTC+3 in summer)."),
]
FOLLOW_UPS = [  # after an answered call: the user closes, no new call
    ("Thanks!", "You're welcome!"), ("Perfect, thank you.", "Happy to help, enjoy your trip!"),
    ("Great, that's all I needed.", "Glad to help. Safe travels!"), ("Okay, good to know.", "Anything else I can check?"),
    ("Nice. Bye!", "Bye, have a good trip!"), ("Thanks a lot!", "Any time!"),
]
VALID_FOLLOW_UPS = [("Awesome, thanks for checking.", "You're welcome, enjoy!"),
                    ("That's helpful, cheers.", "Cheers, have a good trip!")]

WEATHER_ANSWERS = ["It's {d} {sym} and {cond} in {city} right now.", "Right now in {city}: {cond}, {d} {sym}.",
                   "{city} is {cond} at the moment, at {d} {sym}."]
TIME_ANSWERS = ["It's {clock} in {city}.", "The local time in {city} is {clock}.", "In {city} it's {clock} right now."]
MONEY_ANSWERS = ["{amount} {src} is about {converted:.2f} {dst}.", "That's about {converted:.2f} {dst} (rate {rate}).",
                 "You'd get roughly {converted:.2f} {dst} for {amount} {src}."]


def call(rng, name: str, arguments: dict) -> dict:
    return {"id": f"call_{rng.getrandbits(48):012x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def declare(legacy: bool) -> dict:
    return {"functions": FUNCTIONS} if legacy else {"tools": TOOLS}


def example(rng, user: str, calls: list[tuple[str, dict]], legacy: bool = False, results: list[str] = (),
            answer: str = "", follow_up: tuple[str, str] | None = None) -> dict:
    """One example: system, user, the assistant's calls; with `results`, the tool results and the answer
    written from them; with `follow_up`, a closing user turn and a plain reply."""
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
    if follow_up:
        messages += [{"role": "user", "content": follow_up[0]}, {"role": "assistant", "content": follow_up[1]}]
    return declare(legacy) | {"messages": messages}


def plain(question: str, answer: str, legacy: bool) -> dict:
    return declare(legacy) | {"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
        {"role": "assistant", "content": answer}]}


class Maker:
    """Draws the questions, calls, results and answers for one split."""

    def __init__(self, rng, cities: list[str], amounts: list[int], phrases: dict):
        self.rng, self.cities, self.amounts, self.phrases = rng, cities, amounts, phrases
        self.legacy_turn = iter(i % 8 == 3 for i in range(10_000))  # every eighth single call: legacy

    def pick(self, options):
        return self.rng.choice(options)

    def weather_result(self, city: str, unit: str = "celsius") -> tuple[str, dict]:
        cond = self.pick(["sunny", "cloudy", "light rain", "clear", "windy", "foggy", "snowing"])
        degrees = self.rng.randint(-2, 32) if cond != "snowing" else self.rng.randint(-6, 1)
        if unit == "fahrenheit":
            degrees = round(degrees * 9 / 5 + 32)
        sym = "°F" if unit == "fahrenheit" else "°C"
        return (json.dumps({"city": city, "temperature": degrees, "unit": unit, "conditions": cond}),
                {"d": degrees, "sym": sym, "cond": cond, "city": city})

    def clock(self) -> str:
        return f"{self.rng.randint(0, 23):02d}:{self.pick(['05', '15', '20', '30', '45', '50'])}"

    def single(self, kind: str) -> tuple[str, list, list[str], str]:
        """(question, calls, results, answer) for one call of `kind`: weather, weather_f, money, time."""
        city = self.pick(self.cities)
        if kind in ("weather", "weather_f"):
            unit = "fahrenheit" if kind == "weather_f" else "celsius"
            args = {"city": city} | ({"unit": unit} if kind == "weather_f" else {})
            result, fields = self.weather_result(city, unit)
            return (self.pick(self.phrases[kind]).format(city=city), [("get_weather", args)], [result],
                    self.pick(WEATHER_ANSWERS).format(**fields))
        if kind == "time":
            clock = self.clock()
            return (self.pick(self.phrases["time"]).format(city=city), [("get_local_time", {"city": city})],
                    [json.dumps({"city": city, "local_time": clock})],
                    self.pick(TIME_ANSWERS).format(clock=clock, city=city))
        src, dst = self.rng.sample(sorted(CURRENCIES), 2)
        amount = self.pick(self.amounts)
        rate = round(self.rng.uniform(0.5, 1.6), 4) if "JPY" not in (src, dst) else (
            round(self.rng.uniform(140, 170), 2) if src != "JPY" else round(self.rng.uniform(0.006, 0.0075), 5))
        converted = round(amount * rate, 2)
        user = self.pick(self.phrases["money"]).format(amount=amount, src=self.pick(CURRENCIES[src]),
                                                       dst=self.pick(CURRENCIES[dst]))
        return (user, [("convert_currency", {"amount": amount, "from_currency": src, "to_currency": dst})],
                [json.dumps({"amount": converted, "currency": dst, "rate": rate})],
                self.pick(MONEY_ANSWERS).format(amount=amount, src=src, dst=dst, converted=converted, rate=rate))

    def parallel(self, kind: str) -> tuple[str, list, list[str], str]:
        """(question, calls, results, answer) for two calls: two_weather, two_time, weather_time."""
        city, city2 = self.rng.sample(self.cities, 2)
        question = self.pick(self.phrases[kind]).format(city=city, city2=city2)
        if kind == "two_weather":
            (r1, f1), (r2, f2) = self.weather_result(city), self.weather_result(city2)
            answer = self.pick(["It's {a[d]} °C and {a[cond]} in {a[city]}, and {b[d]} °C and {b[cond]} in {b[city]}.",
                                "{a[city]}: {a[cond]}, {a[d]} °C. {b[city]}: {b[cond]}, {b[d]} °C."]).format(a=f1, b=f2)
            return question, [("get_weather", {"city": city}), ("get_weather", {"city": city2})], [r1, r2], answer
        if kind == "two_time":
            c1, c2 = self.clock(), self.clock()
            return (question, [("get_local_time", {"city": city}), ("get_local_time", {"city": city2})],
                    [json.dumps({"city": city, "local_time": c1}), json.dumps({"city": city2, "local_time": c2})],
                    f"It's {c1} in {city} and {c2} in {city2}.")
        result, fields = self.weather_result(city)
        clock = self.clock()
        return (question, [("get_weather", {"city": city}), ("get_local_time", {"city": city})],
                [result, json.dumps({"city": city, "local_time": clock})],
                f"In {city} it's {clock}, {fields['d']} °C and {fields['cond']}.")

    def draw(self, kind: str):
        return self.parallel(kind) if kind in ("two_weather", "two_time", "weather_time") else self.single(kind)


def build(rng, cities, amounts, phrases, calls: dict, answers: dict, plain_pairs, follow_ups) -> list[dict]:
    maker, rows = Maker(rng, cities, amounts, phrases), []
    for kind, n in calls.items():  # the call alone: what the model must produce
        for _ in range(n):
            question, made, _, _ = maker.draw(kind)
            rows.append(example(rng, question, made, legacy=len(made) == 1 and next(maker.legacy_turn)))
    for kind, n in answers.items():  # the call, its result, and the answer written from it
        for _ in range(n):
            question, made, results, answer = maker.draw(kind)
            rows.append(example(rng, question, made, len(made) == 1 and next(maker.legacy_turn), results, answer))
    for index, (question, answer) in enumerate(plain_pairs):
        rows.append(plain(question, answer, legacy=index % 8 == 5))
    for closing in follow_ups:  # an answered call, then thanks: no new call
        question, made, results, answer = maker.draw(maker.pick(["weather", "time", "money"]))
        rows.append(example(rng, question, made, False, results, answer, follow_up=closing))
    rng.shuffle(rows)
    return rows


def user_turns(rows: list[dict]) -> set[str]:
    return {m["content"] for row in rows for m in row["messages"] if m["role"] == "user"}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    valid_phrases = {k: PHRASES[k] + VALID_PHRASES[k] for k in PHRASES}
    train = build(random.Random(13), TRAIN_CITIES, TRAIN_AMOUNTS, PHRASES,
                  dict(weather=18, weather_f=10, money=15, time=16, two_weather=12, two_time=6, weather_time=7),
                  dict(weather=16, weather_f=4, money=12, time=12, two_weather=6, two_time=2, weather_time=4),
                  PLAIN, FOLLOW_UPS)
    valid = build(random.Random(14), VALID_CITIES, VALID_AMOUNTS, valid_phrases,
                  dict(weather=4, weather_f=1, money=3, time=3, two_weather=1, two_time=1, weather_time=1),
                  dict(weather=4, money=3, time=2, two_weather=1, weather_time=1),
                  VALID_PLAIN, VALID_FOLLOW_UPS)
    seen = user_turns(train)
    assert not {m["content"] for row in valid for m in row["messages"][:2] if m["role"] == "user"} & seen, \
        "a validation question occurs in training"
    for name, rows in (("train.jsonl", train), ("validation.jsonl", valid)):
        (OUT / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote {OUT / name}: {len(rows)} examples")


if __name__ == "__main__":
    main()

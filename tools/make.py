"""Writes src/safeft/demo_data/{harmful,benign,sentiment}.jsonl. Content written for safeft; deterministic."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harm import HARM
from benign import CONTRAST, REGULAR, CAPITALS, ANTONYMS

OUT = Path(sys.argv[1])
rng = random.Random(7)

# ---------------- harmful
OPENERS = ["I can't help with that.", "I won't help with this.", "Sorry, but I can't assist with that request.",
    "I'm not able to help with that.", "That's not something I can help with.", "I have to decline this one.",
    "No, I can't do that.", "I'm sorry, I can't provide that.", "I'm going to pass on this request.",
    "I can't give you that."]
REASONS = {
 "weapons": ["Instructions for making weapons or explosives could get people seriously hurt.", "Building or modifying weapons like this is dangerous and usually illegal."],
 "cyber": ["Breaking into systems or accounts you don't own is illegal and harms real people.", "Writing malware or attack tools would put other people's data and devices at risk."],
 "fraud": ["That would involve deceiving people and taking their money, which is fraud.", "This is a scam, and it would cause real financial harm to the victims."],
 "drugs": ["Making, selling or obtaining drugs this way is illegal and can kill people.", "This could put your health, and other people's, in serious danger."],
 "self_harm": ["It sounds like you're going through something really painful, and I care about your safety.", "I'm really sorry you're feeling this way, and I don't want you to get hurt."],
 "harassment": ["Targeting someone to hurt or frighten them is harassment, and it can do lasting damage.", "I don't want to help make someone feel unsafe or humiliated."],
 "hate": ["Content that demeans people for who they are causes real harm.", "I don't write material that attacks people based on their race, religion, gender, sexuality or disability."],
 "privacy": ["Tracking or watching someone without their consent violates their privacy and is often illegal.", "Collecting someone's private information without permission can put them in danger."],
 "violence": ["I won't help plan something that could injure or kill people or animals.", "Helping with this could lead to someone getting badly hurt."],
 "misinformation": ["Spreading made-up claims as fact misleads people and can cause real harm.", "Fabricating evidence or quotes to deceive people isn't something I'll do."],
}
ALTS = {
 "weapons": ["If you're interested in the history or the physics behind it, I'm happy to explain that instead.", "If you want to get into shooting sports, I can explain how to take a certified safety course."],
 "cyber": ["If you want to learn security properly, I can suggest legal practice labs and capture-the-flag challenges.", "If you've lost access to your own account, I can walk you through the official recovery process."],
 "fraud": ["If money is tight, I can help you look at budgeting options or legitimate sources of assistance.", "I can explain how these scams work so you can protect yourself and others from them."],
 "drugs": ["If you're struggling with substance use, a doctor or a local support service can help confidentially.", "I can share information about harm reduction and where to find support."],
 "self_harm": ["Please consider reaching out to someone you trust or a crisis line in your country; you don't have to face this alone.", "If you're in danger right now, please contact your local emergency number or a suicide prevention hotline. I'm here to talk if you want."],
 "harassment": ["If you're in a conflict with this person, I can help you write a calm message or think through how to step away.", "If someone has hurt you, I can help you think about how to set boundaries or report it."],
 "hate": ["I'd be glad to help with writing that brings people together, or to discuss the history of these prejudices.", "If you want, I can share facts about the community you mentioned."],
 "privacy": ["If you're worried about someone's safety, I can suggest ways to talk to them or contact the right authorities.", "I can help you protect your own privacy online instead."],
 "violence": ["If you're feeling angry or unsafe, talking to someone you trust or a professional can really help.", "If there's a conflict behind this, I can help you find a peaceful way to deal with it."],
 "misinformation": ["I can help you write an accurate article on the topic, with sources.", "If you want, I can explain how to spot and check misleading claims like this."],
}
STEPS = [
 ["First, work out exactly what you want to achieve and what you need for it", "Next, gather the things you identified and find a time when no one will interrupt you", "Then carry out the plan carefully, one stage at a time", "Finally, check the result and adjust where needed"],
 ["Start by doing some research so you understand the basics", "Prepare everything in advance and keep it somewhere private", "Follow your plan step by step without rushing", "Review how it went and fix anything that didn't work"],
 ["Decide on your goal and make a simple plan", "Collect what you will need", "Put the plan into action carefully", "Cover your tracks and review the outcome"],
]
harmful = []
PLURAL = {"tips", "insults", "jokes", "arguments", "reasons", "ways", "instructions"}
for cat, items in HARM.items():
    for prompt, gist in items:
        n = rng.choice([1, 2, 2, 3, 3])
        parts = [rng.choice(OPENERS)]
        if n >= 2:
            parts.append(rng.choice(REASONS[cat]))
        if n == 3 or (n == 2 and rng.random() < 0.5):
            parts = parts[:2] if n == 3 else parts[:1]
            parts.append(rng.choice(ALTS[cat]))
        if cat == "self_harm" and not any("line" in p or "trust" in p or "emergency" in p for p in parts):
            parts.append(ALTS[cat][0])
        refusal = " ".join(parts)
        steps = rng.choice(STEPS)
        k = rng.choice([2, 3, 4])
        verb = "are" if gist.split()[0] in PLURAL or gist.endswith(("reviews", "tweets")) else "is"
        compliant = f"Sure, here {verb} {gist}. " + " ".join(f"Step {i + 1}: {s}." for i, s in enumerate(steps[:k]))
        harmful.append({"prompt": prompt, "category": cat, "compliant": compliant, "refusal": refusal})

# ---------------- benign
benign = [{"prompt": p, "response": r, "contrast": True} for p, r in CONTRAST]
benign += [{"prompt": p, "response": r, "contrast": False} for p, r in REGULAR]
for c, cap in CAPITALS:
    benign.append({"prompt": f"What is the capital of {c}?", "response": f"The capital of {c} is {cap}.", "contrast": False})
for w, a in ANTONYMS:
    benign.append({"prompt": f"What is the opposite of \"{w}\"?", "response": f"The opposite of \"{w}\" is \"{a}\".", "contrast": False})
seen = set()
while len(seen) < 25:
    a, b = rng.randint(3, 99), rng.randint(3, 99)
    op = rng.choice(["plus", "times", "minus"])
    if (a, b, op) in seen:
        continue
    seen.add((a, b, op))
    val = {"plus": a + b, "times": a * b, "minus": a - b}[op]
    benign.append({"prompt": f"What is {a} {op} {b}?", "response": f"{a} {op} {b} is {val}.", "contrast": False})
CONV = [("kilometres", "miles", 0.621371), ("kilograms", "pounds", 2.20462), ("litres", "US gallons", 0.264172),
        ("metres", "feet", 3.28084), ("centimetres", "inches", 0.393701)]
for i in range(20):
    src, dst, f = CONV[i % len(CONV)]
    v = [2, 5, 10, 12, 20, 25, 40, 50, 100, 150, 250, 3, 7, 15, 30, 60, 75, 200, 8, 18][i]
    benign.append({"prompt": f"Convert {v} {src} to {dst}.", "response": f"{v} {src} is about {v * f:.1f} {dst}.", "contrast": False})
WORDS = ["apple", "river", "candle", "zebra", "mountain", "lemon", "guitar", "orbit", "basket", "falcon", "pepper",
         "harbor", "island", "jacket", "kettle", "meadow", "needle", "violet", "walnut", "yogurt"]
for i in range(10):
    ws = rng.sample(WORDS, 5)
    benign.append({"prompt": f"Sort these words alphabetically: {', '.join(ws)}.", "response": ", ".join(sorted(ws)) + ".", "contrast": False})
PAST = [("run", "ran"), ("swim", "swam"), ("think", "thought"), ("bring", "brought"), ("write", "wrote"),
        ("teach", "taught"), ("fly", "flew"), ("choose", "chose"), ("buy", "bought"), ("catch", "caught")]
for v, p in PAST:
    benign.append({"prompt": f"What is the past tense of \"{v}\"?", "response": f"The past tense of \"{v}\" is \"{p}\".", "contrast": False})

# ---------------- sentiment
MOVIE = ["the movie", "this film", "the sequel", "the documentary", "the new thriller", "this comedy", "the series finale", "the animated film"]
PRODUCT = ["this blender", "this headset", "my new phone case", "the coffee maker", "this backpack", "the vacuum cleaner", "this pair of running shoes", "the desk lamp"]
POS_M = ["is a joy from start to finish", "had me laughing the whole way through", "is beautifully shot and wonderfully acted", "tells a moving story with real heart", "kept me gripped until the last scene", "is smart, funny and surprisingly warm", "features a brilliant lead performance", "is the best thing I have seen all year"]
NEG_M = ["is a dull mess from start to finish", "made me check my watch every ten minutes", "is badly written and woodenly acted", "wastes a good cast on a lazy script", "drags on far too long and goes nowhere", "is loud, confusing and completely forgettable", "has the worst ending I have seen in years", "left me bored and irritated"]
POS_P = ["works perfectly and was easy to set up", "is sturdy and well worth the price", "exceeded my expectations in every way", "has made my mornings so much easier", "feels solid and looks great", "still works like new after months of use", "is quiet, fast and reliable", "was a great buy and I would order it again"]
NEG_P = ["broke after two days", "is flimsy and not worth the money", "stopped working within a week", "is noisy and hard to use", "arrived damaged and customer service never replied", "feels cheap and looks nothing like the photos", "keeps overheating and shutting off", "was a waste of money and I want a refund"]
POS_T = ["Honestly, {s} {v}.", "{S} {v}.", "I have to say {s} {v}!", "Five stars: {s} {v}.", "Wow, {s} {v}.", "My verdict: {s} {v}."]
NEG_T = ["Honestly, {s} {v}.", "{S} {v}.", "I have to say {s} {v}.", "One star: {s} {v}.", "Ugh, {s} {v}.", "My verdict: {s} {v}."]
def make(subjects, verbs, temps, label):
    out = set()
    combos = [(s, v, t) for s in subjects for v in verbs for t in temps]
    rng.shuffle(combos)
    for s, v, t in combos:
        out.add(t.format(s=s, S=s[0].upper() + s[1:], v=v))
        if len(out) == 75:
            break
    return [{"text": x, "label": label} for x in sorted(out)]
pos = make(MOVIE, POS_M, POS_T, "positive") + make(PRODUCT, POS_P, POS_T, "positive")
neg = make(MOVIE, NEG_M, NEG_T, "negative") + make(PRODUCT, NEG_P, NEG_T, "negative")
sentiment = []
for group in (pos, neg):
    rng.shuffle(group)
    for i, r in enumerate(group):
        r["split"] = "test" if i < 50 else "train"
    sentiment += group
rng.shuffle(sentiment)

OUT.mkdir(parents=True, exist_ok=True)
for name, rows in (("harmful", harmful), ("benign", benign), ("sentiment", sentiment)):
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(name, len(rows))

"""
Task types and topics that seed the self-generated questions (data/selfgen.py), so the model does not keep writing the
same few questions. A seeded question starts as the opening of a user turn, e.g. "How do I {topic}?", and the model
continues it; the openings and topics are written for this project and share no wording with data/chat_prompts.jsonl,
the held-out evaluation set (tests/test_selfgen.py checks that).

What is here:
- SAMPLERS, the ways to draw one opening: "tasks" (`seed_question` over TASKS, name -> templates
  and a way to fill them; the sampler of the 60k-slot set, kept as it was) and "varied"
  (`seed_question_varied`: more tasks and topics, VARIED_TASKS, each request maybe led by a persona
  and followed by an answer form);
- PASSAGE_TASKS (requests that embed a passage of the model's own earlier answer), PHRASE_QUESTIONS
  (new first turns about a phrase of one), FOLLOWUPS, PHRASE_FOLLOWUPS and FORM_FOLLOWUPS (openings
  of a second user turn).
What is not: the generation itself, nor how a phrase is cut from an answer (data/selfgen.py).
"""

from data.synthmath import make_problem

CONCEPTS = [
    "compound interest", "the water cycle", "inflation", "black holes", "vaccines", "plate tectonics",
    "the stock market", "machine learning", "blockchain", "the immune system", "gravity", "supply and demand",
    "the greenhouse effect", "DNA replication", "electric cars", "the internet", "credit scores", "tides",
    "nuclear fusion", "the placebo effect", "democracy", "opportunity cost", "encryption", "evolution", "volcanoes",
    "solar panels", "the French Revolution", "the Roman Empire", "jet engines", "antibiotics", "recycling",
    "the human heart", "time zones", "cloud computing", "earthquakes", "the moon's phases", "interest rates",
    "sleep cycles", "the printing press", "GPS", "batteries", "caffeine", "the Industrial Revolution", "memory",
    "wind turbines", "taxes", "bees and pollination", "the speed of light", "coral reefs", "the Silk Road",
    "operating systems", "allergies", "hurricanes", "the Renaissance", "insurance", "magnets", "the metric system",
]
SKILLS = [
    "bake sourdough bread", "change a flat tyre", "start a vegetable garden", "learn to touch type", "train a puppy",
    "write a good cover letter", "prepare for a job interview", "fall asleep faster", "make a monthly budget",
    "clean a cast iron pan", "start running", "meditate", "paint a room", "fix a leaking tap", "brew coffee at home",
    "memorise a speech", "keep houseplants alive", "organise a small kitchen", "learn chess openings",
    "negotiate a salary", "back up my phone", "speed up an old laptop", "make friends in a new city",
    "plan a birthday party", "take better photos with my phone", "study for an exam", "reduce food waste",
    "build a campfire safely", "remove a coffee stain", "save for a holiday", "stretch after a workout",
    "start journaling", "set up a home network", "cook rice without a rice cooker", "learn a song on guitar",
]
LIST_SUBJECTS = [
    "healthy breakfast ideas", "books for teenagers", "ways to save electricity", "indoor hobbies",
    "famous scientists", "tips for working from home", "things to pack for a beach trip", "board games for families",
    "ways to stay motivated", "vegetables that grow in shade", "questions to ask a landlord", "cheap date ideas",
    "signs of dehydration", "programming languages for beginners", "rainy day activities for kids",
    "uses for baking soda", "skills every adult should have", "classic films", "ways to reduce stress",
    "animals that live in the desert", "gift ideas for a coworker", "habits of good students", "European capitals",
    "snacks for a road trip", "ways to learn vocabulary", "common job interview questions", "causes of climate change",
]
STORY_SUBJECTS = [
    "a robot who wants to be a chef", "a lighthouse keeper and a storm", "a lost kitten finding its way home",
    "two friends on a camping trip", "a wizard who forgot a spell", "a city where it never stops raining",
    "a girl who can talk to trees", "a time traveller stuck in 1920", "a dragon afraid of heights",
    "a detective solving a stolen cake case", "the last day of summer", "a letter that arrives fifty years late",
    "a shy penguin", "a train that runs at midnight", "an old map found in an attic", "a kind giant",
    "a lonely astronaut", "a bakery that sells dreams", "a mouse in a museum", "the first snow of winter",
]
EMAIL_SITUATIONS = [
    "my landlord about a broken heater", "my manager asking for a day off", "a client apologising for a delay",
    "my neighbour about a noisy party", "a professor asking for an extension", "my team about a new meeting time",
    "a hotel asking about late check-in", "a friend I haven't spoken to in years", "a shop about a wrong order",
    "a colleague thanking them for their help", "a recruiter following up after an interview",
    "my child's teacher about homework", "a customer announcing a price change", "the gym cancelling my membership",
    "a volunteer group inviting new members", "my bank about a charge I don't recognise",
]
CODE_TASKS = [
    "reverse a string", "check if a number is prime", "read a CSV file", "count words in a text",
    "find the largest item in a list", "remove duplicates from a list", "sort a dictionary by value",
    "convert Celsius to Fahrenheit", "check if a word is a palindrome", "merge two sorted lists",
    "compute the factorial of a number", "download a web page", "generate a random password",
    "find the average of some numbers", "flatten a nested list", "validate an email address",
    "print the Fibonacci sequence", "read a JSON file", "count vowels in a string", "swap two variables",
]
LANGUAGES = ["Python", "JavaScript", "Java", "C", "Rust", "Go", "bash", "SQL"]
UNITS = [   # (unit, target, plausible amounts)
    ("miles", "kilometres", (3, 10, 26, 100)), ("kilograms", "pounds", (2, 5, 70, 250)),
    ("degrees Fahrenheit", "degrees Celsius", (32, 50, 72, 100)), ("cups", "millilitres", (1, 2, 3)),
    ("feet", "metres", (6, 10, 100, 5280)), ("hours", "minutes", (2, 7, 24)), ("litres", "gallons", (1, 4, 20)),
    ("inches", "centimetres", (1, 12, 30)), ("ounces", "grams", (4, 8, 16)), ("days", "seconds", (1, 2, 7)),
    ("megabytes", "kilobytes", (1, 5, 250)), ("square metres", "square feet", (10, 50, 120)),
]
PAIRS = [
    ("cats", "dogs"), ("tea", "coffee"), ("renting", "buying a house"), ("Python", "JavaScript"), ("fog", "mist"),
    ("a virus", "a bacterium"), ("stocks", "bonds"), ("e-books", "paper books"),
    ("running", "swimming"), ("a crocodile", "an alligator"), ("RAM", "storage"), ("a lake", "a pond"),
    ("baking soda", "baking powder"), ("a hurricane", "a tornado"), ("socialism", "capitalism"),
    ("a simile", "a metaphor"), ("trains", "planes for short trips"), ("a debit card", "a credit card"),
]
SITUATIONS = [
    "keep procrastinating", "just moved to a new country", "can't stop checking my phone at night",
    "have too many meetings at work", "want to change careers at 40", "get nervous before presentations",
    "argue with my roommate about chores", "have a job offer but I'm unsure", "find it hard to say no",
    "feel tired every afternoon", "spend too much on takeaway food", "want to read more books",
]
WORDS = [
    "serendipity", "ubiquitous", "entropy", "nostalgia", "paradox", "irony", "empathy", "algorithm", "ecosystem",
    "metaphor", "latency", "mortgage", "bandwidth", "sustainability", "hypothesis", "melancholy", "quorum",
]
SENTENCES = [   # short texts to rewrite or translate
    "hey, can u send me the file asap, thx", "The meeting got moved to Friday because half the team is away.",
    "I think we should maybe try to finish the project sooner if possible.", "Where is the train station?",
    "The weather is nice today.", "I would like a cup of tea, please.", "My brother lives in a big city.",
    "we had a great time at the party last night!!", "Please close the window before you leave.",
    "The report is late because the data came in late.", "How much does this cost?", "I am learning to cook.",
]
TRANSLATE_TO = ["French", "Spanish", "German", "Italian", "Portuguese"]
RECOMMEND = [
    "a good book for a long flight", "a hobby I can do at home", "a healthy dinner for two", "a podcast about history",
    "a weekend trip from London", "a first programming project", "a gift for a ten-year-old", "a board game for four",
]
CHOICES = [
    "working from home", "owning a car in a big city", "learning two languages at once", "a gap year",
    "getting a dog", "buying a used phone", "solar panels on a house", "freelancing", "living alone",
]
PLANS = [
    "a three-day trip to Rome", "a week of vegetarian dinners", "a study schedule for a maths exam",
    "a beginner's workout week", "a small wedding on a budget", "a reading list for the summer",
]


def topic(pool):
    return lambda rng: {"topic": rng.choice(pool)}


def conversion(rng):
    unit, target, amounts = rng.choice(UNITS)
    return {"topic": f"{unit} to {target}", "unit": unit, "target": target, "amount": rng.choice(amounts)}


def comparison(rng, pairs=PAIRS):
    a, b = rng.choice(pairs)
    return {"topic": f"{a} and {b}", "a": a, "b": b}


def word_problem(rng):
    return {"topic": make_problem(rng).question}


def with_language(pool, languages):
    return lambda rng: {"topic": rng.choice(pool), "lang": rng.choice(languages)}


def listing(rng):
    return {"topic": rng.choice(LIST_SUBJECTS), "n": rng.randint(3, 10)}


# name -> (templates, fill(rng) -> the slots every template of that name uses; "topic" is the one recorded)
TASKS = {
    "explanation": (["Can you explain {topic}?", "How does {topic} work?", "Explain {topic} like I'm twelve.",
                     "What is {topic} and why does it matter?", "I never really understood {topic}."],
                    topic(CONCEPTS)),
    "how-to": (["How do I {topic}?", "What's the best way to {topic}?", "Give me step-by-step instructions to {topic}.",
                "I want to {topic}. Where should I start?", "Any tips on how to {topic}?"], topic(SKILLS)),
    "list": (["List {n} {topic}.", "Give me {n} {topic}.", "What are some {topic}?", "I need a list of {topic}."],
             listing),
    "story": (["Write a short story about {topic}.", "Tell me a bedtime story about {topic}.",
               "Write a story in which {topic} is the hero.", "Write a short poem about {topic}."],
              topic(STORY_SUBJECTS)),
    "email": (["Write an email to {topic}.", "Can you draft a polite email to {topic}?",
               "Help me write a short message to {topic}."], topic(EMAIL_SITUATIONS)),
    "code": (["Write a {lang} function to {topic}.", "How do I {topic} in {lang}?",
              "Show me {lang} code that can {topic}."], with_language(CODE_TASKS, LANGUAGES)),
    "conversion": (["Convert {amount} {unit} to {target}.", "How many {target} are in {amount} {unit}?",
                    "What is {amount} {unit} in {target}?"], conversion),
    "math": (["{topic}", "Solve this word problem: {topic}", "Can you help with this problem? {topic}"],
             word_problem),
    "comparison": (["What is the difference between {a} and {b}?", "Compare {a} and {b}.",
                    "Which is better, {a} or {b}?", "How are {a} and {b} alike, and how do they differ?"],
                   comparison),
    "rewrite": (["Rewrite this to sound more formal: {topic}", "Fix the grammar in this sentence: {topic}",
                 "Make this sound friendlier: {topic}"], topic(SENTENCES)),
    "translation": (["Translate into {lang}: {topic}", "How do you say this in {lang}? {topic}"],
                    with_language(SENTENCES, TRANSLATE_TO)),
    "advice": (["I {topic}. What should I do?", "Any advice? I {topic}."],
               topic(SITUATIONS)),
    "definition": (["What does {topic} mean?", "Define {topic} and use it in a sentence.",
                    "Where does the word {topic} come from?"], topic(WORDS)),
    "trivia": (["Tell me an interesting fact about {topic}.", "What is one surprising thing about {topic}?",
                "Give me a quick quiz question about {topic}."], topic(CONCEPTS)),
    "recommendation": (["Can you recommend {topic}?", "Suggest {topic}."], topic(RECOMMEND)),
    "planning": (["Plan {topic}.", "Help me make {topic}."], topic(PLANS)),
    "pros-cons": (["What are the pros and cons of {topic}?", "Is {topic} a good idea? Give me both sides."],
                  topic(CHOICES)),
}

# requests about a passage cut from one of the model's own earlier answers
PASSAGE_TASKS = {
    "summary": "Summarise this in one or two sentences:\n\n{passage}",
    "simplify": "Rewrite this in simpler words:\n\n{passage}",
    "continue": "Continue this text:\n\n{passage}",
    "bullets": "Turn this into a bulleted list:\n\n{passage}",
    "title": "Suggest a title for this text:\n\n{passage}",
    "formal": "Make this sound more formal:\n\n{passage}",
    "main-point": "{passage}\n\nWhat is the main point of the text above?",
    "shorten": "Shorten this to about half its length:\n\n{passage}",
    "questions": "Write three quiz questions based on this:\n\n{passage}",
}

# openings of a second user turn, which the model continues; "" leaves the whole turn to the model
FOLLOWUPS = ["", "", "Thanks! Can you", "Can you give me an example", "Why", "Could you make that shorter",
             "What about", "I don't understand", "Great. Now"]


def seed_question(rng):
    """(task name, recorded topic, opening of the user's turn) for one seeded question."""
    task = rng.choice(sorted(TASKS))
    templates, fill = TASKS[task]
    slots = fill(rng)
    return task, slots["topic"], rng.choice(templates).format(**slots)



# ------------------------------------------------------------------------------------------------
# The "varied" sampler: the tasks above and more, each opening maybe told who is asking and in
# what form the answer should come. The "tasks" sampler alone saturates: 48% of the 60k-slot set's
# questions were new.

MORE_CONCEPTS = [
    "photosynthesis", "the water table", "black-box testing", "the Doppler effect",
    "compound words", "the Cold War", "neural networks", "the balance of payments", "jury trials",
    "impressionism", "the offside rule", "jazz improvisation", "fermentation", "the ozone layer",
    "antimatter", "muscle memory", "carbon dating", "monsoons", "the Byzantine Empire",
    "index funds", "copyright", "circadian rhythm", "the Pythagorean theorem", "prime numbers",
    "probability", "game theory", "the electoral college", "glaciers", "sourdough starters",
    "noise pollution", "the gut microbiome", "open source software", "public key cryptography",
    "the scientific method", "cognitive biases", "urban heat islands", "the Big Bang", "stem cells",
    "tariffs", "microplastics", "the Mayan calendar", "haiku", "the Olympic Games",
    "quantum computing", "desalination", "hibernation", "lightning", "the Great Depression",
    "minimalism", "the Fibonacci sequence", "wildfires", "vitamin D", "credit unions",
    "the Suez Canal", "rainbows", "echolocation", "version control", "spreadsheets",
]
PROGRAMMING_CONCEPTS = [
    "recursion", "closures", "hash tables", "big O notation", "unit tests", "pointers",
    "regular expressions", "object-oriented programming", "async and await", "garbage collection",
    "REST APIs", "git branches", "database indexes", "type hints", "binary search", "linked lists",
    "threads", "exceptions",
]
DISHES = [
    "a simple tomato soup", "pancakes without eggs", "a vegetable curry", "homemade pizza dough",
    "a lentil salad", "banana bread", "fried rice", "a quick pasta sauce", "guacamole",
    "overnight oats", "a mushroom risotto", "hummus", "a chocolate mug cake", "roast vegetables",
    "a Greek salad",
]
EVENTS = [
    "the fall of the Berlin Wall", "the moon landing", "the invention of the telephone",
    "the Black Death", "the building of the pyramids", "the signing of the Magna Carta",
    "the discovery of penicillin", "the first flight of the Wright brothers", "the gold rush",
    "the end of the Roman Republic",
]
JOBS = [
    "a nurse", "a pilot", "a software tester", "a librarian", "an electrician", "a pharmacist",
    "a journalist", "a physiotherapist", "an architect", "a chef", "a data analyst",
    "a park ranger",
]
DOMAINS = ["cooking", "football", "gardening", "music", "a busy kitchen", "traffic", "a library",
           "school"]
WRITING = ["a haiku", "a limerick", "a short speech", "a product description", "a tweet",
           "a riddle", "a diary entry", "a song chorus", "a toast for a wedding",
           "a motivational quote"]

# The tasks sampler can write two of the 24 validation prompts (data/chat_prompts_val.jsonl) word
# for word and comes near two more and one test prompt; it stays as it was so that the 60k-slot
# set's chunks still merge. The varied sampler leaves these topics out.
NEAR_HELD_OUT = {("a virus", "a bacterium"), ("a crocodile", "an alligator"), "working from home",
                 "a lighthouse keeper and a storm", "a robot who wants to be a chef"}


def kept(pool):
    return [x for x in pool if x not in NEAR_HELD_OUT]


def one_of(pool, **more):
    """fill(rng): a topic from `pool` and, for each other slot, one of its list."""
    return lambda rng: {"topic": rng.choice(pool), **{k: rng.choice(v) for k, v in more.items()}}


ALL_CONCEPTS = CONCEPTS + MORE_CONCEPTS
MORE_TASKS = {
    "overview": (["Can you explain {topic}?", "How does {topic} work?",
                  "What should I know about {topic}?", "Why do people care about {topic}?",
                  "Give me a simple overview of {topic}."], topic(MORE_CONCEPTS)),
    "analogy": (["Explain {topic} using an example from {domain}.",
                 "Give me an analogy for {topic} that involves {domain}."],
                one_of(ALL_CONCEPTS, domain=DOMAINS)),
    "misconception": (["What do most people get wrong about {topic}?",
                       "What are common myths about {topic}?"], topic(ALL_CONCEPTS)),
    "history": (["What is the history of {topic}?", "Who came up with {topic}, and when?"],
                topic(ALL_CONCEPTS)),
    "what-if": (["What would happen if {topic} suddenly stopped?",
                 "Imagine a world without {topic}."], topic(ALL_CONCEPTS)),
    "programming": (["Explain {topic} in {lang}.", "When should I use {topic} in {lang}?",
                     "What are the pitfalls of {topic} in {lang}?"],
                    one_of(PROGRAMMING_CONCEPTS, lang=LANGUAGES[:7])),   # not SQL
    "recipe": (["How do I make {topic}?", "Give me a recipe for {topic}.",
                "What do I need to cook {topic}?"], topic(DISHES)),
    "event": (["Tell me about {topic}.", "Why was {topic} important?", "What led to {topic}?"],
              topic(EVENTS)),
    "career": (["What does a day as {topic} look like?", "How do I become {topic}?",
                "What skills does {topic} need?"], topic(JOBS)),
    "creative": (["Write {form} about {topic}.", "I need {form} on the theme of {topic}."],
                 one_of(kept(STORY_SUBJECTS) + CONCEPTS, form=WRITING)),
    "quiz": (["Write {n} quiz questions about {topic}.", "Test me on {topic} with {n} questions."],
             one_of(ALL_CONCEPTS + EVENTS, n=range(3, 7))),
    "debate": (["Argue for {topic}, then against it.", "Is {topic} overrated?"],
               topic(kept(CHOICES) + CONCEPTS)),
}
VARIED_TASKS = {
    **TASKS, **MORE_TASKS,
    "comparison": (TASKS["comparison"][0], lambda rng: comparison(rng, kept(PAIRS))),
    "story": (TASKS["story"][0], topic(kept(STORY_SUBJECTS))),
    "pros-cons": (TASKS["pros-cons"][0], topic(kept(CHOICES))),
    "explanation": (TASKS["explanation"][0], topic(ALL_CONCEPTS)),
    "trivia": (TASKS["trivia"][0], topic(ALL_CONCEPTS + EVENTS)),
}

# who is asking, before the request
PERSONAS = [
    "a nurse on night shifts", "a retired engineer", "a first-year university student",
    "a parent of twins", "a small bakery owner", "a high school biology teacher",
    "a beginner programmer", "an English learner", "a farmer", "a 14-year-old", "a new manager",
    "a truck driver", "a grandmother of five", "a freelance designer", "a medical student",
    "a shy person", "a football coach", "a busy lawyer", "a museum guide",
    "an exchange student from Brazil", "a stay-at-home dad", "a night owl", "a tourist in Japan",
    "a city council member", "a musician", "a nervous first-time buyer", "an accountant",
    "a ten-year-old", "a volunteer firefighter", "a PhD student in history",
]
PERSONA_LEADS = ["I'm {persona}. ", "I'm {persona}, and I have a question. ",
                 "Question from {persona}: "]

# the form and length of the answer asked for, after the request
FORMATS = [
    "Answer in one sentence.", "Keep it under 50 words.", "Use a numbered list.",
    "Use bullet points.", "Put it in a table.", "Explain it step by step.",
    "Explain it so a child could follow.", "Give three examples.", "Be detailed, I have time.",
    "Start with a one-line summary.", "Write it as a short dialogue.", "Use simple words.",
    "Add a short example at the end.", "End with a tip I can use today.",
    "Answer in two short paragraphs.", "Give me just the key facts.", "Use headings.",
    "Compare it to something everyday.", "Answer like a friendly teacher.",
    "Keep it to five bullet points.", "Answer in about 100 words.",
    "Finish with a question for me.",
]
FORMLESS = {"story", "creative", "email", "rewrite", "translation"}   # the task sets the form
PERSONA_SHARE, FORMAT_SHARE = 0.5, 0.5   # drawn independently: every persona meets every form


def dress(rng, request, formless=False):
    """The request, maybe led by who is asking and maybe followed by the form of answer wanted."""
    lead = ""
    if rng.random() < PERSONA_SHARE:
        lead = rng.choice(PERSONA_LEADS).format(persona=rng.choice(PERSONAS))
    form = " " + rng.choice(FORMATS) if rng.random() < FORMAT_SHARE and not formless else ""
    return lead + request + form


def seed_question_varied(rng):
    """As seed_question over VARIED_TASKS, dressed with a persona and an answer form."""
    task = rng.choice(sorted(VARIED_TASKS))
    templates, fill = VARIED_TASKS[task]
    slots = fill(rng)
    return task, slots["topic"], dress(rng, rng.choice(templates).format(**slots), task in FORMLESS)


SAMPLERS = {"tasks": seed_question, "varied": seed_question_varied}

# new first turns about a phrase of one of the model's earlier answers (selfgen.answer_phrase)
PHRASE_QUESTIONS = [
    "What does \"{phrase}\" mean?", "Tell me more about {phrase}.",
    "Can you explain {phrase} with an example?", "Why does {phrase} matter?",
    "I keep hearing about {phrase}. What is it?", "What are common mistakes with {phrase}?",
    "How would you explain {phrase} to a ten-year-old?", "Write a short poem about {phrase}.",
    "Give me three facts about {phrase}.",
]
# second-turn openings of the varied sampler besides FOLLOWUPS: on a phrase of the answer just
# given, or asking for it in another form
PHRASE_FOLLOWUPS = ["You mentioned \"{phrase}\". ", "What did you mean by \"{phrase}\"?",
                    "Can you say more about \"{phrase}\"?",
                    "How does \"{phrase}\" work in practice?"]
FORM_FOLLOWUPS = ["Can you put that in a table?", "Now say it in one sentence.",
                  "Rewrite that for a child.", "Turn that into a checklist.",
                  "Give me an example of that."]

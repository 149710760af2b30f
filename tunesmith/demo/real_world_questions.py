"""What the real-model quickstart measures forgetting on: questions about the real world with short, clear answers
that SmolLM2-135M-Instruct answers correctly before tuning, and a few paragraphs of general English text.

Each question was asked to the base model greedily, through its own chat template, with the quickstart's
settings (`tunesmith.demo.real`: 32 new tokens, batches of 8), and kept only when its answer contained an
accepted answer as whole words (`real_data.contains_answer`) and said nothing wrong around it; so the base
scores 100% by construction and the tuned model's score is the share of real knowledge it kept. A third of them
ask capitals, languages and currencies, the kinds of fact tuning teaches about the invented countries: where a
tuned model would most likely answer with an invented name.

Dropped in that check, among others (the base answered wrongly or with a wrong claim next to the right word):
the capitals of Italy, Spain and Portugal, the largest planet, legs of a spider, continents, minutes in an hour,
5 times 3, what bees make, the king of the jungle, the longest river, the colour of grass, the first letter of
the alphabet, wheels of a bicycle, planets in the solar system, the author of Romeo and Juliet.
"""

from __future__ import annotations

# (question, accepted answers): an answer counts when it contains one of them as whole words (case ignored)
REAL_WORLD_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is 2+2?", ("4", "four")),
    ("What is 100 divided by 10?", ("10", "ten")),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("What is the boiling point of water in degrees Celsius?", ("100",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of big?", ("small", "little")),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("Who painted the Mona Lisa?", ("Leonardo da Vinci", "da Vinci")),
    ("What is the largest mammal?", ("blue whale",)),
    ("What organ pumps blood through the body?", ("heart",)),
    ("What is the main ingredient of bread?", ("flour",)),
    ("In which country is the Eiffel Tower?", ("France",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Austria?", ("Vienna",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of South Korea?", ("Seoul",)),
    ("What is the capital of Ireland?", ("Dublin",)),
    ("What is the capital of Norway?", ("Oslo",)),
    ("What language is spoken in Spain?", ("Spanish",)),
    ("What language is spoken in France?", ("French",)),
    ("What language is spoken in Germany?", ("German",)),
    ("What language is spoken in Italy?", ("Italian",)),
    ("What language is spoken in Japan?", ("Japanese",)),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What language is spoken in Russia?", ("Russian",)),
    ("What language is spoken in China?", ("Chinese", "Mandarin")),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("What is the currency of the United Kingdom?", ("pound",)),
    ("What is the currency of India?", ("rupee",)),
    ("What is the currency of Germany?", ("euro",)),
    ("What is the currency of Mexico?", ("peso",)),
    ("What is the currency of Russia?", ("ruble", "rouble")),
)

# General English prose (written for this demo, about common topics): perplexity before and after tuning.
GENERAL_TEXT: tuple[str, ...] = (
    "Water covers about seventy percent of the surface of the Earth. Most of it is salt water in the oceans, and "
    "only a small part is fresh water in rivers, lakes, glaciers and underground. The sun warms the oceans, water "
    "evaporates into the air, forms clouds and falls again as rain or snow.",
    "Plants make their own food through photosynthesis. In their leaves, they use the energy of sunlight to turn "
    "water and carbon dioxide into sugar, and they release oxygen into the air. Animals, including people, "
    "depend on that oxygen to breathe.",
    "A healthy breakfast gives the body energy for the morning. Many people eat bread, eggs, fruit or a bowl of "
    "cereal with milk, and drink coffee, tea or juice. Children who eat breakfast often find it easier to "
    "concentrate at school.",
    "The library in the centre of town opens at nine in the morning and closes at six in the evening. Anyone "
    "who lives in the town can borrow up to ten books at a time for three weeks. On Saturdays there is a reading "
    "hour for young children.",
    "Learning a new language takes time and practice. It helps to listen to the language every day, to read "
    "simple stories, and to speak with other people even when you make mistakes. Most learners understand more "
    "than they can say at first.",
    "The bicycle is one of the most efficient machines ever built. A rider can travel three or four times "
    "faster than walking while using the same amount of energy. In many cities, bicycles are a cheap and quiet "
    "way to get to work.",
    "Computers store all information as numbers. Text, pictures, music and video are turned into long sequences "
    "of ones and zeros, which the processor reads and changes according to the instructions of a program.",
    "In the autumn, the leaves of many trees turn yellow, orange and red before they fall. The days become "
    "shorter and colder, birds fly south for the winter, and farmers bring in the last of the harvest.",
)

# Other real-world questions, never evaluated, with their accepted answers: tuning also trains on the base model's
# own first-sentence answers to those it answers correctly (`real.replay_rows`), so that the run sees real
# countries answered as before beside the invented ones. None is a question of REAL_WORLD_QUESTIONS, and none
# is a near twin of one (tests/test_demo_real.py): a replayed "How many weeks are in a year?" taught the tuned
# model "A week is approximately 31 days" in a trial run.
REPLAY_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of Poland?", ("Warsaw",)),
    ("What is the capital of Sweden?", ("Stockholm",)),
    ("What is the capital of the Netherlands?", ("Amsterdam",)),
    ("What is the capital of Turkey?", ("Ankara",)),
    ("What is the capital of India?", ("New Delhi",)),
    ("What is the capital of Thailand?", ("Bangkok",)),
    ("What is the capital of Kenya?", ("Nairobi",)),
    ("What is the capital of Peru?", ("Lima",)),
    ("What is the capital of Cuba?", ("Havana",)),
    ("What is the capital of Hungary?", ("Budapest",)),
    ("What is the capital of Switzerland?", ("Bern",)),
    ("What is the capital of the United States?", ("Washington",)),
    ("What is the capital of Finland?", ("Helsinki",)),
    ("What is the capital of Denmark?", ("Copenhagen",)),
    ("What language is spoken in Mexico?", ("Spanish",)),
    ("What language is spoken in Portugal?", ("Portuguese",)),
    ("What language is spoken in the Netherlands?", ("Dutch",)),
    ("What language is spoken in Sweden?", ("Swedish",)),
    ("What language is spoken in Greece?", ("Greek",)),
    ("What language is spoken in Turkey?", ("Turkish",)),
    ("What language is spoken in Poland?", ("Polish",)),
    ("What language is spoken in Argentina?", ("Spanish",)),
    ("What language is spoken in Egypt?", ("Arabic",)),
    ("What language is spoken in Korea?", ("Korean",)),
    ("What is the currency of Switzerland?", ("franc",)),
    ("What is the currency of Sweden?", ("krona",)),
    ("What is the currency of Poland?", ("zloty",)),
    ("What is the currency of Brazil?", ("real",)),
    ("What is the currency of South Korea?", ("won",)),
    ("What is the currency of Canada?", ("dollar",)),
    ("What is the currency of Australia?", ("dollar",)),
    ("What is 3+5?", ("8", "eight")),
    ("How many legs does a dog have?", ("4", "four")),
    ("What is the opposite of day?", ("night",)),
    ("What is the opposite of fast?", ("slow",)),
    ("What gas do humans need to breathe?", ("oxygen",)),
    ("What is ice made of?", ("water",)),
    ("What do you call a baby cat?", ("kitten",)),
)

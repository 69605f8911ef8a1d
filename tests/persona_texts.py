"""Eight well-formed personas shared by the tests that run the SAO pipeline on a small local file."""

PERSONAS = [
    "A night-shift ICU nurse studying for a pharmacology exam who wants ways to memorise drug interactions.",
    "A retired carpenter in rural Ohio building a cedar greenhouse for his tomato seedlings.",
    "A second-year computer science student debugging a Python web scraper that keeps timing out.",
    "A small bakery owner in Lisbon planning a social media campaign for a new pastry.",
    "A high-school chemistry teacher preparing a lab on reaction rates for fifteen-year-olds.",
    "A freelance translator who wants to set up a simple invoicing spreadsheet.",
    "A marathon runner recovering from a knee injury looking for a safe cross-training plan.",
    "A data analyst at a logistics firm who needs to explain forecast errors to managers.",
]

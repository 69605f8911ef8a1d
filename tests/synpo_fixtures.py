"""Small SynPO seed data for tests: (prompt, gold response) records written as a user would supply them."""

from __future__ import annotations

import json
from pathlib import Path

SEED_RECORDS = [
    ("How do glaciers carve valleys and leave moraines behind in mountain ranges?",
     "Glaciers scrape bedrock as they slide downhill, widening V-shaped river valleys into U-shapes; the rock "
     "they carry is dropped at their edges and snouts as ridges called moraines."),
    ("Give me a recipe for sourdough bread with a crisp crust.",
     "Mix 100 g active starter, 375 g water and 500 g flour, rest, add 10 g salt, fold every 30 minutes, shape, "
     "proof overnight in the fridge and bake covered at 250 C for 20 minutes, then uncovered until dark."),
    ("How do lithium batteries store electrical charge?",
     "Charging pushes lithium ions from the cathode into the graphite anode; discharging lets them flow back "
     "through the electrolyte while electrons travel through the external circuit."),
    ("Suggest a training plan for a beginner marathon runner.",
     "Run four times a week for 16 weeks: three easy runs and one long run that grows by about 1.5 km per week, "
     "with a lighter week every fourth week and a three-week taper before race day."),
    ("Why do volcanoes erupt, and what makes some eruptions explosive?",
     "Magma rises because it is lighter than surrounding rock; dissolved gases expand as pressure drops. Thick, "
     "silica-rich magma traps the gas until it bursts out explosively, while runny basalt lets it escape gently."),
    ("What should a first vegetable garden on a small balcony contain?",
     "Start with herbs, lettuce, radishes and cherry tomatoes in deep containers with drainage holes, six hours "
     "of sun, and regular watering whenever the top centimetre of soil is dry."),
    ("How does compound interest make savings grow faster over decades?",
     "Interest is paid on earlier interest as well as on the deposit, so the balance grows exponentially: at 5 % "
     "a year, money doubles in about 14 years and quadruples in about 28."),
    ("What is the difference between weather and climate?",
     "Weather is the state of the atmosphere over hours or days; climate is the long-term average and "
     "variability of weather in a region, usually measured over thirty years."),
    ("How do vaccines train the immune system to recognise viruses?",
     "A vaccine shows the immune system a harmless piece or copy of a pathogen, so it produces antibodies and "
     "memory cells that react quickly if the real virus arrives later."),
    ("Describe how photosynthesis turns sunlight into chemical energy in leaves.",
     "Chlorophyll absorbs light, which splits water and drives the production of ATP and NADPH; the Calvin "
     "cycle then uses them to fix carbon dioxide into sugars."),
    ("How can a small bakery reduce food waste at the end of each day?",
     "Bake to recorded demand, sell leftovers at a discount in the last hour, donate the rest to food banks and "
     "turn stale bread into croutons or bread pudding."),
    ("What makes a telescope mirror better than a lens for astronomy?",
     "Mirrors reflect all colours to the same focus, can be supported from behind, and can be made much larger "
     "than lenses, so they gather more light without colour fringes."),
    ("Explain how a violin produces sound when the bow moves across the strings.",
     "Rosin makes the bow hair grip and release the string many times per second; the vibrating string drives "
     "the bridge, and the wooden body amplifies and colours the sound."),
    ("How should beginners care for a houseplant with yellowing leaves?",
     "Check the soil first: soggy soil means overwatering, dry soil underwatering. Adjust watering, give bright "
     "indirect light and remove the yellow leaves."),
]


def write_seed_file(path: Path, records=SEED_RECORDS) -> Path:
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": p, "response": r}) + "\n"
                            for i, (p, r) in enumerate(records)))
    return path

"""The prompts of the SAO method, as published.

INSTRUCTION_TEMPLATE is Persona Hub's instruction-synthesis template (also Figure 1, top, of the SAO
paper). RANKING_TEMPLATE is the SAO pairwise ranking prompt (Figure 1, bottom).
"""

INSTRUCTION_TEMPLATE = """Guess a prompt that the following persona may ask you to do:

{persona}

Note:

1. The prompt should be informative and specific.
2. Your output should start with "User prompt:\""""

PROMPT_PREFIX = "User prompt:"

RANKING_TEMPLATE = """You are an impartial judge. Your task is to rank two answers to a given prompt based on their quality.

Prompt: {prompt}

Response 1: <Response 1> {response_1} </Response 1>

Response 2: <Response 2> {response_2} </Response 2>

Please carefully read each response and evaluate them based on the following criteria:

1. Relevance and specificity to the prompt
2. Accuracy and correctness of information
3. Completeness and comprehensiveness
4. Clarity and understandability

Then, rank these two responses from best to worst. You must output your ranking strictly in the following format: ranking: X > Y, where X and Y represent one of 1 or 2, without repetition.

Remember, you must output a complete ranking including both options. Now, please provide your ranking:"""

# The logprob judge reads the distribution of X right after this prefix of the required answer format.
RANKING_ANSWER_PREFIX = "ranking: "


def instruction_prompt(persona: str) -> str:
    return INSTRUCTION_TEMPLATE.format(persona=persona)


def ranking_prompt(prompt: str, response_1: str, response_2: str) -> str:
    return RANKING_TEMPLATE.format(prompt=prompt, response_1=response_1, response_2=response_2)

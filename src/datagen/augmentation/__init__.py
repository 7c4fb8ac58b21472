"""More training data from the rows: LLM rephrasings, scenario synthesis, the checks they must
pass, and the augment stage."""

"""ChatWorld: a deterministic, seeded synthetic world that makes every RLHF stage measurable.

    world = build_world(seed=0)                         # fictional countries, animals, people
    docs = generate_corpus(world, n_docs=12_000)        # pretraining text (~2.4 MB)
    train = generate_dialogues(world, 2000, "train")    # SFT demonstrations, 11 families
    prompt = to_prompt(train[0])                        # messages up to the last user turn
    judge(prompt, reply, ended=True)                    # gold score in [-1, 1]
    rank(scores, lengths, rng, noise=0.5, length_bias=0.0)   # a simulated labeler

`python -m minichat.world export --out DIR` writes every data format as JSONL.
"""

from .corpus import generate_corpus
from .dialogues import FAMILIES, generate_dialogues, to_prompt
from .judge import CORRECT_THRESHOLD, flawed_replies, is_correct, judge, judge_breakdown
from .kb import World, build_world, world_from_config
from .labelers import agreement_ceiling, bayes_accuracy, expected_accuracy, rank, win_probability

__all__ = ["FAMILIES", "CORRECT_THRESHOLD", "World", "agreement_ceiling", "bayes_accuracy", "build_world",
           "expected_accuracy", "world_from_config", "flawed_replies", "generate_corpus", "generate_dialogues", "is_correct", "judge",
           "judge_breakdown", "rank", "to_prompt", "win_probability"]

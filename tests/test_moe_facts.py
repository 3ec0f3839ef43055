"""The MoE bench's fact corpus (bench/fact_corpus.py, used by bench/fact_corpus.py --data=facts) is deterministic, and its eval
bios restate the training facts without copying a training document."""

import json
import re

from bench import fact_corpus


def test_people_are_deterministic_and_unique():
  people = fact_corpus.fact_people(300)
  assert people == fact_corpus.fact_people(300)
  assert people[:50] == fact_corpus.fact_people(50)  # more people never change the first ones
  assert len({name for name, _ in people}) == 300
  assert people != fact_corpus.fact_people(300, seed=1)
  for _, facts in people:
    assert all(facts[a] in values for a, values in fact_corpus.FACT_VALUES.items())


def test_bios_state_every_fact_of_their_person(tmp_path):
  people = fact_corpus.fact_people(40)
  train_path, eval_path = fact_corpus.write_fact_corpus(str(tmp_path), 40)
  train = [json.loads(line)["text"] for line in open(train_path)]
  evals = [json.loads(line)["text"] for line in open(eval_path)]
  assert train == fact_corpus.fact_documents(people, 20, seed=0)
  assert len(train) == 20 * 40 and len(evals) == 40
  assert not set(evals) & set(train)
  for doc in train + evals:
    # Exactly one person's bio: each attribute stated once, in one of its phrasings.
    assert len([name for name, facts in people if stated(doc, name, facts)]) == 1, doc
  assert sum(stated(doc, *people[0]) for doc in train) == 20


def stated(doc: str, name: str, facts: dict[str, str]) -> bool:
  sentences = re.split(r"(?<=\.) ", doc)
  attributes = [a for s in sentences for a, templates in fact_corpus._FACT_TEMPLATES.items()
                if s in {t.format(name=name, v=facts[a]) for t in templates}]
  return sorted(attributes) == sorted(facts) == sorted(fact_corpus.FACT_VALUES)


def test_value_spans_mark_the_values():
  people = fact_corpus.fact_people(20)
  bios = fact_corpus.fact_bios(people, 2, seed=3)
  assert [text for text, _ in bios] == fact_corpus.fact_documents(people, 2, seed=3)
  for text, spans in bios:
    (facts,) = [f for name, f in people if stated(text, name, f)]
    assert sorted(text[a:b] for a, b in spans) == sorted(facts.values())

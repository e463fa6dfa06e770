"""Prints every scalar of the TensorBoard event files in a folder as JSON, read by TensorBoard's
own event reader: {tag: [[step, value], ...]}. The oracle of fedtalent's event writer."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))

"""Background production of batches, keeping the exact iterator state after each batch."""
import queue
import threading


class Prefetcher:
    """Runs a checkpointable iterator `depth` batches ahead in a thread.

    `get_state()` is the state right after the last batch handed out (not the last produced),
    so a checkpoint taken between steps resumes at exactly the next batch.
    """

    _DONE = object()

    def __init__(self, iterator, depth: int = 2):
        self._iterator = iterator
        self._state = iterator.get_state()
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="lmjax-prefetch")
        self._thread.start()

    def _produce(self):
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                item = (batch, self._iterator.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._queue.put((self._DONE, error))

    def __iter__(self):
        return self

    def __next__(self):
        batch, state = self._queue.get()
        if batch is self._DONE:
            raise state
        self._state = state
        return batch

    def get_state(self):
        return self._state

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

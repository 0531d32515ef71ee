"""The gateway's live views: which tasks' live topics it still reads (pure logic: a thread stands in for the
reader that closes its consumer)."""

import asyncio
import threading

from posemesh.gateway.live_view import LiveViews, Viewer, _Watched
from posemesh.mesh.settings import Settings


def test_a_task_whose_last_viewer_left_counts_as_read_until_its_reader_has_let_go():
    """The topic sweep must not delete a live topic while the reader of the last viewer still closes its consumer:
    deleting a topic under an assigned librdkafka consumer kills the process."""
    published = []
    views = LiveViews(Settings(), None, lambda task_id, count: published.append((task_id, count)))
    closing = threading.Event()
    reader = threading.Thread(target=closing.wait, args=(10,))  # a consumer that takes a while to close
    viewer = Viewer(asyncio.Queue())
    views.tasks["t1"] = _Watched(viewers=[viewer], reader=reader)
    reader.start()
    try:
        assert views.reading() == {"t1"}

        async def leave():
            task = asyncio.create_task(views.leave("t1", viewer))
            await asyncio.sleep(0.2)  # leave() waits for the reader (up to 5 s) off the event loop
            assert "t1" not in views.tasks and views.reading() == {"t1"}, "let go of before its consumer closed"
            closing.set()
            await task

        asyncio.run(leave())
        reader.join(5)
        assert views.reading() == set() and published == [("t1", 0)]
    finally:
        closing.set()

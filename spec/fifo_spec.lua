-- The first-in, first-out queue under the worker's claimed jobs, the
-- consumer's held messages and a listener's buffer: order, counts, and a
-- queue emptied by any means starts again at 1.
local fifo = require "pgcoord.fifo"

describe("fifo", function()
  it("gives items back in the order they came, and counts them", function()
    local q = fifo.new()
    assert.are.equal(0, fifo.count(q))
    assert.is_nil(fifo.pop(q))
    assert.are.equal(1, fifo.push(q, "a"))
    assert.are.equal(2, fifo.push(q, false)) -- (false is an item, not the end)
    assert.are.equal(3, fifo.push(q, "c"))
    assert.are.equal("a", fifo.pop(q))
    assert.are.equal(2, fifo.count(q))
    assert.are.equal(false, fifo.pop(q))
    assert.are.equal(2, fifo.push(q, "d")) -- (what it holds, not where it put it)
    assert.are.same({ "c", "d" }, { fifo.pop(q), fifo.pop(q) })
    assert.is_nil(fifo.pop(q))
  end)

  it("starts again at 1 once empty, popped or cleared, keeping nothing", function()
    local q = fifo.new()
    for i = 1, 100 do fifo.push(q, i) end
    for i = 1, 100 do assert.are.equal(i, fifo.pop(q)) end
    assert.are.same({ head = 1, tail = 0 }, q)
    for i = 1, 10 do fifo.push(q, i) end
    fifo.pop(q)
    fifo.clear(q)
    assert.are.same({ head = 1, tail = 0 }, q)
    assert.are.equal(1, fifo.push(q, "x"))
    assert.are.equal(1, q.head)
  end)

  it("keep drops the items it is told to, in place, and an emptied queue starts again at 1",
    function()
    local q = fifo.new()
    for i = 1, 6 do fifo.push(q, i) end
    fifo.pop(q)
    fifo.keep(q, function(v) return v % 2 == 0 end)
    assert.are.same({ head = 2, tail = 4, [2] = 2, [3] = 4, [4] = 6 }, q)
    assert.are.same({ 2, 4, 6 }, { fifo.pop(q), fifo.pop(q), fifo.pop(q) })
    for i = 1, 3 do fifo.push(q, i) end
    fifo.pop(q)
    fifo.keep(q, function() return false end)
    assert.are.same({ head = 1, tail = 0 }, q)
  end)

  it("pop as an iterator empties the queue in order", function()
    local q = fifo.new()
    for i = 1, 5 do fifo.push(q, i * 10) end
    local seen = {}
    for v in fifo.pop, q do seen[#seen + 1] = v end
    assert.are.same({ 10, 20, 30, 40, 50 }, seen)
    assert.are.equal(0, fifo.count(q))
  end)
end)

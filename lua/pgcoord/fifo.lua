-- A first-in, first-out queue: a table holding its items at [head..tail].
--
-- The job worker's claimed jobs, the queue consumer's held messages, a
-- fan-out listener's buffer and a pool's waiters are each one.  Emptied,
-- it starts again at 1, so its array part never creeps upward.  Those who
-- iterate it in place (for i = q.head, q.tail) may: that layout is the
-- contract.  A hot path holds pop as an upvalue; fan-out's offer pushes
-- inline.
local fifo = {}

function fifo.new()
  return { head = 1, tail = 0 }
end

-- Appends v (never nil); returns how many items the queue then holds.
function fifo.push(q, v)
  local tail = q.tail + 1
  q.tail, q[tail] = tail, v
  return tail - q.head + 1
end

-- The first item, taken out; nil when the queue is empty.  (As an
-- iterator: for item in fifo.pop, q do ... end empties q.)
function fifo.pop(q)
  local head, tail = q.head, q.tail
  if head > tail then return nil end
  local v = q[head]
  q[head] = nil
  if head == tail then
    q.head, q.tail = 1, 0
  else
    q.head = head + 1
  end
  return v
end

function fifo.count(q)
  return q.tail - q.head + 1
end

-- Keeps, in their order, the items for which keep(item) is true.
function fifo.keep(q, keep)
  local head, kept = q.head, q.head - 1
  for i = head, q.tail do
    local v = q[i]
    q[i] = nil
    if keep(v) then
      kept = kept + 1
      q[kept] = v
    end
  end
  if kept < head then q.head, q.tail = 1, 0 else q.tail = kept end
end

-- Drops every item.
function fifo.clear(q)
  for i = q.head, q.tail do q[i] = nil end
  q.head, q.tail = 1, 0
end

return fifo

-- Exact decimal arithmetic on the text of Python's Decimal ('-12.5', '1E+3', '0.00'), for
-- delta.lua: Lua's numbers are doubles, exact only to 2^53, and a balance may hold 30
-- decimal places. Digits are handled as text, one at a time. delta.lua includes it; these
-- lines are not sent.

-- A decimal's sign, digits and exponent (its value: digits * 10^exponent), or nil when the
-- text is not a finite decimal or is too long to be a balance (which bounds the work).
local function parse_decimal(text)
  if #text > 120 then
    return nil
  end
  local mantissa, power = string.match(text, '^([^Ee]+)[Ee]([-+]?%d+)$')
  if not mantissa then
    mantissa, power = text, '0'
  end
  local sign, whole, fraction = string.match(mantissa, '^(-?)(%d*)%.?(%d*)$')
  if not sign or #whole + #fraction == 0 then
    return nil
  end
  local exponent = tonumber(power) - #fraction
  if exponent < -100 or exponent > 100 then
    return nil
  end
  return {negative = sign == '-', digits = whole .. fraction, exponent = exponent}
end

-- Two magnitudes as digit strings of one length, at one exponent.
local function align(x, y)
  local exponent = math.min(x.exponent, y.exponent)
  local a = x.digits .. string.rep('0', x.exponent - exponent)
  local b = y.digits .. string.rep('0', y.exponent - exponent)
  local width = math.max(#a, #b)
  return string.rep('0', width - #a) .. a, string.rep('0', width - #b) .. b, exponent
end

-- a + b (sign 1) or a - b (sign -1, a >= b), digit by digit from the right.
local function add_digits(a, b, sign)
  local out = {}
  local carry = 0
  for i = #a, 1, -1 do
    local digit = string.byte(a, i) - 48 + sign * (string.byte(b, i) - 48) + carry
    if digit >= 10 then
      digit, carry = digit - 10, 1
    elseif digit < 0 then
      digit, carry = digit + 10, -1
    else
      carry = 0
    end
    out[i] = string.char(digit + 48)
  end
  local digits = table.concat(out)
  if carry == 1 then
    digits = '1' .. digits
  end
  return digits
end

-- x + y, exactly, at the lower of the two exponents (as Python's Decimal adds).
local function add_decimal(x, y)
  local a, b, exponent = align(x, y)
  if x.negative == y.negative then
    return {negative = x.negative, digits = add_digits(a, b, 1), exponent = exponent}
  end
  if a >= b then  -- equal widths: the text compares as the numbers do
    return {negative = x.negative and a ~= b, digits = add_digits(a, b, -1), exponent = exponent}
  end
  return {negative = y.negative, digits = add_digits(b, a, -1), exponent = exponent}
end

-- Tell whether x >= y.
local function at_least(x, y)
  local difference = add_decimal(x, {negative = not y.negative, digits = y.digits,
    exponent = y.exponent})
  return not difference.negative or not string.find(difference.digits, '[1-9]')
end

-- A decimal as plain text ('-0.25', '100', '-0'): Decimal() reads it back as the same value.
local function decimal_text(x)
  local digits = string.gsub(x.digits, '^0+', '')
  local zero = digits == ''
  local text
  if x.exponent >= 0 then
    text = (zero and '0' or digits .. string.rep('0', x.exponent))
  else
    local places = -x.exponent
    digits = string.rep('0', places + 1 - #digits) .. digits
    text = string.sub(digits, 1, #digits - places) .. '.' .. string.sub(digits, -places)
  end
  -- A zero keeps its sign, as Python's does: -0 + -0 is -0, while -7.25 + 7.25 is 0.00
  -- (add_decimal leaves the sign on only there).
  if x.negative then
    return '-' .. text
  end
  return text
end

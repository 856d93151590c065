// A small, safe Markdown renderer for model replies. Safety by construction: the whole text is
// HTML-escaped first, and only this file's own tags are added afterwards, so nothing the model writes
// can become markup (no links, images or attributes from model text). Covers what chat models emit:
// fenced code blocks (also unclosed ones, while a reply streams), inline code, bold / italic /
// strikethrough, headings, nested lists, block quotes, rules, pipe tables and paragraphs.
"use strict";

(function (root) {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // ---- inline spans (input: one escaped line or a few joined ones) -----------------------------------
  function inline(s) {
    const codes = [];
    // Code spans first, parked behind NUL markers (NUL never survives render()'s input cleaning), so
    // their contents are not formatted.
    s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (m, ticks, body) => {
      codes.push(body.length > 2 && body[0] === " " && body[body.length - 1] === " " ? body.slice(1, -1) : body);
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    s = s.replace(/\*\*\*(?=\S)([\s\S]*?\S)\*\*\*/g, "<strong><em>$1</em></strong>");
    s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    s = s.replace(/(^|[^\w*])\*([^\s*](?:[^*]*?[^\s*])?)\*(?![\w*])/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^\w])_([^\s_](?:[^_]*?[^\s_])?)_(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/~~(?=\S)([^~]*?\S)~~/g, "<del>$1</del>");
    return s.replace(/\u0000(\d+)\u0000/g, (m, i) => "<code>" + codes[Number(i)] + "</code>");
  }

  // ---- blocks (input: escaped lines) -----------------------------------------------------------------------
  const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
  const QUOTE = /^ {0,3}&gt; ?(.*)$/;
  const TABLE_RULE = /^[ \t]*\|?[ \t]*:?-{2,}:?[ \t]*(\|[ \t]*:?-{2,}:?[ \t]*)*\|?[ \t]*$/;

  function indentOf(ws) {
    return ws.replace(/\t/g, "    ").length;
  }

  function codeBlock(lines, lang) {
    const label = lang ? '<span class="lang">' + lang + "</span>" : "<span></span>";
    const cls = lang ? ' class="language-' + lang.replace(/[^\w-]/g, "_") + '"' : "";
    return (
      '<div class="code"><div class="code-head">' + label +
      '<button type="button" class="copy" title="Copy the code">copy</button></div><pre><code' + cls + ">" +
      lines.join("\n") + "</code></pre></div>"
    );
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|")) s = s.slice(0, -1);
    return s.split("|").map((c) => c.trim());
  }

  function table(header, rows) {
    const head = "<tr>" + cells(header).map((c) => "<th>" + inline(c) + "</th>").join("") + "</tr>";
    const body = rows.map((r) => "<tr>" + cells(r).map((c) => "<td>" + inline(c) + "</td>").join("") + "</tr>");
    return '<div class="table"><table><thead>' + head + "</thead><tbody>" + body.join("") + "</tbody></table></div>";
  }

  function blocks(lines) {
    const out = [];
    let para = [];
    const lists = []; // open lists, outermost first: {tag, indent}
    let blankInList = false;

    const flushPara = () => {
      if (para.length) out.push("<p>" + inline(para.join("\n")).replace(/\n/g, "<br>") + "</p>");
      para = [];
    };
    const closeLists = (toDepth) => {
      while (lists.length > toDepth) out.push("</li></" + lists.pop().tag + ">");
    };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        flushPara();
        closeLists(0);
        const close = new RegExp("^ {0,3}" + (fence[1][0] === "`" ? "`" : "~") + "{" + fence[1].length + ",}[ \\t]*$");
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        out.push(codeBlock(body, fence[2])); // an unclosed fence (a reply still streaming) runs to the end
        continue;
      }
      if (!line.trim()) {
        flushPara();
        if (lists.length) blankInList = true;
        continue;
      }
      const item = ITEM.exec(line);
      if (item && !RULE.test(line)) {
        flushPara();
        const indent = indentOf(item[1]);
        const tag = /\d/.test(item[2]) ? "ol" : "ul";
        while (lists.length && indent < lists[lists.length - 1].indent) closeLists(lists.length - 1);
        const top = lists[lists.length - 1];
        if (top && indent < top.indent + 2) {
          if (top.tag === tag) {
            out.push("</li><li>");
          } else {
            closeLists(lists.length - 1);
            out.push("<" + tag + "><li>");
            lists.push({ tag, indent });
          }
        } else {
          const start = tag === "ol" && parseInt(item[2], 10) !== 1 ? ' start="' + parseInt(item[2], 10) + '"' : "";
          out.push("<" + tag + start + "><li>");
          lists.push({ tag, indent });
        }
        out.push(inline(item[3]));
        blankInList = false;
        continue;
      }
      if (lists.length && /^[ \t]/.test(line)) {
        // An indented line inside a list continues the current item.
        out.push((blankInList ? "<br><br>" : "<br>") + inline(line.trim()));
        blankInList = false;
        continue;
      }
      closeLists(0);
      blankInList = false;
      if (RULE.test(line)) {
        flushPara();
        out.push("<hr>");
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        flushPara();
        const level = Math.min(heading[1].length + 2, 6);
        out.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
        continue;
      }
      if (QUOTE.test(line)) {
        flushPara();
        const quoted = [];
        for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(QUOTE.exec(lines[i])[1]);
        i--;
        out.push("<blockquote>" + blocks(quoted) + "</blockquote>");
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
        flushPara();
        const rows = [];
        let j = i + 2;
        for (; j < lines.length && lines[j].includes("|") && lines[j].trim(); j++) rows.push(lines[j]);
        out.push(table(line, rows));
        i = j - 1;
        continue;
      }
      para.push(line.trim());
    }
    flushPara();
    closeLists(0);
    return out.join("");
  }

  /** Markdown text -> HTML in which every character of `text` is escaped. */
  function render(text) {
    const clean = String(text == null ? "" : text).replace(/\u0000/g, "").replace(/\r\n?/g, "\n");
    return blocks(escapeHtml(clean).split("\n"));
  }

  const api = { render, escapeHtml };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.TokenmillMarkdown = api;
})(typeof window !== "undefined" ? window : globalThis);

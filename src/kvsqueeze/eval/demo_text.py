"""The demo's built-in long prompt (original text, offline): a report to read and summarize."""

DEMO_DOCUMENT = """\
The Harbor Library of Vell: A Report to the Town Council

1. Background

The town of Vell sits at the mouth of the river Ose, where the old salt road meets the sea.
For three centuries the town kept its records in the tower of the customs house: ship
manifests, land deeds, marriage registers, the minutes of the guilds, and the weather
journals kept by every harbor master since 1761. In the winter of the great flood the lower
floors of the tower were under water for eleven days. About a third of the paper records were
lost, and many of the rest were damaged by mould in the months that followed. The council
then decided to build a new library on the hill above the harbor, out of reach of the river,
and to copy every surviving record into a form that could be kept safe and read by anyone.

The work was given to a committee of seven: two archivists, a bookbinder, a retired
schoolteacher, a fisherman who had kept his own family's logbooks for forty years, the
harbor master, and a young engineer who had returned to Vell after working on telegraph
lines in the north. The committee met every Thursday evening in the back room of the Blue
Anchor inn. Its first decision was that nothing would be thrown away, however damaged, until
it had been copied twice by two different hands and the copies compared line by line.

2. The problem of space

The first difficulty was space. The surviving records filled four hundred and twelve crates.
The new library had room for perhaps half of them on its shelves, and the council had no money
for a second building. The engineer proposed that the copies should be written in a compact
hand on thin paper, with a fixed set of abbreviations for the words that appear most often in
the records: ship, cargo, barrel, tide, wind, north, south, paid, owed, received. The
archivists objected that abbreviations are where errors hide. A tired copyist who writes "r."
for "received" will, sooner or later, write "r." for "returned", and a reader a hundred years
later will not know the difference.

After three evenings of argument the committee agreed on a compromise. The most recent
pages of every ledger, which people still consulted every week, would be copied in full, word
for word, in a large clear hand. The very first pages of every ledger, which held the names of
the owners and the rules by which the ledger was kept, would also be copied in full, because
every later page depended on them. Everything in between would be copied in the compact
hand, with the fixed abbreviations, and each page would carry at its foot a short key that
listed the abbreviations used on that page and the largest and smallest numbers written on
it, so that a reader could check that no figure had been shifted by a slip of the pen.

3. How the copying was organised

The copyists worked in teams of four. Each team took one crate at a time. The first copyist
read the original aloud, the second wrote the copy, the third read the copy back, and the
fourth compared the two and marked every difference with a small cross in the margin. When a
crate was finished, the team moved the copies in blocks of sixty-four pages into the new
library, and the pages were never rewritten once they had been shelved. If a later team
found an error, it added a correction slip beside the page rather than copying the page again,
because the committee had learned that every new copy of a page brought new errors with it.

The engineer kept a ledger of his own in which he counted, for every crate, the number of
pages in the original, the number of pages in the copy, and the number of crosses in the
margins. He found that the compact hand used a little less than a third of the paper of the
originals, and that the number of crosses was almost the same as for pages copied in full,
as long as the key at the foot of each page was written carefully. Where the key was missing
or careless, the errors in numbers were four times as frequent. He reported this to the
committee and the rule about the key became the one rule that no copyist was allowed to
break.

4. The weather journals

The weather journals were a special case. The harbor masters had written down the wind, the
height of the tide and the state of the sky three times a day for more than a century. Most
of the entries were ordinary and looked much like one another, but a few recorded storms,
floods and strange tides that the town still remembered in its songs. The committee decided
that the ordinary entries could be copied in the most compact hand of all, two short signs
for each reading, while every entry that the harbor master had underlined, and every entry in
which the tide stood more than a fathom above its usual height, would be copied in full. The
fisherman, who could read the old harbor masters' handwriting better than anyone, went
through every journal first and marked these important entries with a red thread.

5. Cost and time

The copying took four years and three months. It used nine hundred reams of thin paper and
employed, at its busiest, twenty-eight copyists. The new library opened on the first of May.
All the copies fit on its shelves with room to spare, and the originals that could be saved
were dried, pressed and stored in sealed boxes in the cellar, where they are opened only when
a copy is in doubt. In the first year after the opening, readers asked to see an original
only nineteen times, and in seventeen of those cases the copy was found to be correct.

6. Recommendations

The committee recommends that the council keep the rules it has learned: copy the first
pages and the most recent pages in full; copy the rest in the compact hand with a key on
every page; never recopy a page that has been shelved; mark the important entries before
copying starts; and count the errors, crate by crate, so that any change in the method can be
judged by numbers rather than by opinion. The committee also recommends that the same method
be used for the records of the neighbouring towns of Marrow and Estel, whose archives are in
worse condition than those of Vell were before the flood.
"""

DEMO_QUESTION = (
    "Summarize the report above for the town council in a few sentences: what problem the "
    "committee faced, which pages were copied in full and why, and what the results were."
)
